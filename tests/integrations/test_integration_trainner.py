"""The traiNNer-redux adapter, in the style of traiNNer's own loss tests
(``tests/test_losses/test_losses.py``: a ``data`` fixture, a ``TestLosses`` class, black vs black
below ``EPSILON``).

traiNNer-redux is not on PyPI: these tests run where ``traiNNer`` is importable (from a
checkout of https://github.com/the-database/traiNNer-redux on ``sys.path``) and are skipped
elsewhere. Its generic fixture, one 16 x 16 image, is not a valid input for a batch
statistic: a batch needs at least two images (one image has nothing to compare with), each
at least as large as the backbone's chosen layer needs. The fixture here uses two 32 x 32
images, and one test checks what the generic fixture gets: an error that says what to change.
"""

from __future__ import annotations

from typing import TypedDict

import pytest
import torch
from torch import Tensor

pytest.importorskip("traiNNer", exc_type=ImportError)
pytest.importorskip("traiNNer.utils.registry", exc_type=ImportError)

from traiNNer.losses import build_loss  # noqa: E402
from traiNNer.utils.registry import LOSS_REGISTRY  # noqa: E402

from d2sm_loss import SemanticStatisticsLoss  # noqa: E402
from d2sm_loss.integrations.trainner import D2SMLoss, register  # noqa: E402

EPSILON = 1e-5
OPTIONS = {"backbone": "mobilenetv2_100", "pretrained": False}


class TestLossData(TypedDict):
    device: str
    black_image: Tensor
    dtype: torch.dtype


@pytest.fixture
def data() -> TestLossData:
    # traiNNer's fixture, with two images of 32 x 32 (its 1 x 16 x 16 is too few and too small)
    dtype = torch.float32
    return {"device": "cpu", "dtype": dtype, "black_image": torch.zeros((2, 3, 32, 32), dtype=dtype)}


class TestD2SMLoss:
    def test_registered_under_lower_case_name(self) -> None:
        assert LOSS_REGISTRY.get("d2smloss") is D2SMLoss
        register()  # again: nothing changes
        loss = build_loss({"type": "d2smloss", "loss_weight": 0.1, **OPTIONS})
        assert isinstance(loss, D2SMLoss) and loss.loss_weight == 0.1

    def test_black_vs_black(self, data: TestLossData) -> None:
        loss_fn = D2SMLoss(1.0, **OPTIONS)
        assert loss_fn(data["black_image"], data["black_image"]) <= EPSILON

    def test_returns_the_unweighted_loss(self) -> None:
        # The model multiplies by loss_weight; the loss must not apply it a second time.
        torch.manual_seed(0)
        plain = SemanticStatisticsLoss(**OPTIONS)
        loss_fn = D2SMLoss(0.25, **OPTIONS)
        loss_fn.backbone.load_state_dict(plain.backbone.state_dict())
        x, y = torch.rand(3, 3, 40, 40), torch.rand(3, 3, 40, 40)
        value = loss_fn(x, y)
        assert value.shape == torch.Size([]) and value > EPSILON
        torch.testing.assert_close(value, plain(x, y))

    @pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16])
    def test_under_the_model_autocast(self, amp_dtype: torch.dtype) -> None:
        # traiNNer calls losses inside torch.autocast(device_type, dtype=amp_dtype) with an
        # output from the network in that dtype; the backbone and statistic stay float32.
        torch.manual_seed(0)
        loss_fn = D2SMLoss(1.0, **OPTIONS)
        x, y = torch.rand(3, 3, 40, 40), torch.rand(3, 3, 40, 40)
        reference = loss_fn(x.to(amp_dtype).float(), y)
        output = x.to(amp_dtype).requires_grad_()
        with torch.autocast("cpu", dtype=amp_dtype):
            value = loss_fn(output, y)
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, reference, rtol=1e-4, atol=1e-7)
        value.backward()
        assert output.grad is not None and torch.isfinite(output.grad).all() and output.grad.abs().sum() > 0

    def test_generic_fixture_is_refused_with_what_to_change(self) -> None:
        loss_fn = D2SMLoss(1.0, **OPTIONS)
        with pytest.raises(ValueError, match="too small") as small:
            loss_fn(torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 16, 16))
        assert "lq_size in traiNNer-redux" in str(small.value)
        with pytest.raises(ValueError, match="single image") as single:
            loss_fn(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32))
        assert "batch_size_per_gpu" in str(single.value)
