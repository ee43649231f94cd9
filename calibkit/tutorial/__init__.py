"""What the notebooks stand on: profiles and set-up, the experiments behind notebooks 02 and 04, tables, figures,
widgets, the percentile distribution gallery and the notebook runner. It may import every other floor; nothing
imports it."""

from calibkit.tutorial.profiles import (
    QUANT_PROFILES, QuantProfile, TutorialSetup, get_quant_profile, load_float_model, setup,
)
