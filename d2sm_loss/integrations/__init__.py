"""The D2SM loss in training frameworks.

- :mod:`d2sm_loss.integrations.basicsr_losses`: the loss with BasicSR's conventions
  (``loss_weight``, the perceptual slot's ``(percep, style)`` pair); imports no framework,
  so that vendored BasicSR copies (NAFNet, Restormer...) can import its classes.
- ``d2sm_loss.integrations.basicsr``: registers them in the installed BasicSR on import;
  ``python -m d2sm_loss.integrations.basicsr -opt options.yml`` trains with BasicSR's pipeline.
- :mod:`d2sm_loss.integrations.trainner_losses` and ``d2sm_loss.integrations.trainner``:
  the same for traiNNer-redux (the model applies ``loss_weight``; lower-case registry name).

Lightning and accelerate need no adapter: :class:`~d2sm_loss.SemanticStatisticsLoss` is an
``nn.Module`` (LightningCLI's ``class_path: d2sm_loss.SemanticStatisticsLoss``); see the
examples and the Frameworks guide. Importing this package imports no framework.
"""
