"""What the notebooks stand on: profiles and set-up (``profiles``), the experiments behind notebook 02
(``workflow``) and notebook 04 (``comparison``, ``tuning``, with their shared ``settings``), the stand-in model and
image folder of notebook 07 (``own_model``), the exports and timings of notebook 08 (``deploy``), the one table type
(``table``), every figure (``figures``, ``experiment_figures``, ``report_figures``, ``qat_figures``,
``float_figures``, ``deploy_figures``), the percentile explorer (``widgets``), the distribution gallery
(``gallery``) and the notebook runner (``runner``). It may import every other floor; nothing imports it."""

from calibkit.tutorial.profiles import (
    NOTEBOOK_DEFAULTS, QUANT_PROFILES, QuantProfile, TutorialSetup, get_quant_profile, load_float_model,
    resolve_parameters, setup,
)
