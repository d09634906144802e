"""Every implementation of the statistic through one contract (``tests/contract.py``): the
exact torch path, the streaming path, the Triton kernels (through the interpreter without a
GPU), the memory queue's incremental statistic, and the loss module, which must equal the
function on its own rows.

Each implementation is one class; ``pytest_generate_tests`` gives it the problems of its
:class:`contract.Implementation` (the interpreter's are few and small)."""

from __future__ import annotations

import contract
import pytest
import torch

from d2sm_loss import similarity_kl

from helpers import BAD_SHARED_OPTIONS, conv_loss, option_id


def pytest_generate_tests(metafunc):
    implementation = getattr(metafunc.cls, "implementation", None)
    if implementation is None:
        return
    if "problem" in metafunc.fixturenames:
        metafunc.parametrize("problem,similarity,include_self", list(contract.oracle_cases(implementation)))
    elif "similarity" in metafunc.fixturenames:
        metafunc.parametrize("similarity,include_self", contract.MODES,
                             ids=[f"{s}-{'self' if i else 'noself'}" for s, i in contract.MODES])


class ContractTests:
    """The checks of the contract for one implementation (subclasses set ``implementation``)."""

    implementation: contract.Implementation

    def _skip(self, check: str) -> None:
        reason = self.implementation.skip_reason(check)
        if reason:
            pytest.skip(reason)

    def test_value_and_gradient_match_the_float64_oracle(self, problem, similarity, include_self):
        self._skip("oracle")
        contract.check_oracle(self.implementation, problem, similarity, include_self)

    def test_gradcheck(self, similarity, include_self):
        self._skip("gradcheck")
        contract.check_gradcheck(self.implementation, similarity, include_self)

    def test_second_order(self, similarity, include_self):
        self._skip("second_order")
        contract.check_second_order(self.implementation, similarity, include_self)

    def test_compile(self):
        self._skip("compile")
        contract.check_compile(self.implementation)


class TestReference(ContractTests):
    implementation = contract.IMPLEMENTATIONS["reference"]


class TestStreaming(ContractTests):
    implementation = contract.IMPLEMENTATIONS["streaming"]


class TestTriton(ContractTests):
    implementation = contract.IMPLEMENTATIONS["triton"]


class TestQueue(ContractTests):
    implementation = contract.IMPLEMENTATIONS["queue"]


@pytest.mark.parametrize("case", BAD_SHARED_OPTIONS, ids=option_id)
def test_function_and_module_refuse_the_same_bad_options(case):
    """An option the function and the module share is checked by one rule: the same error and
    message from :func:`~d2sm_loss.similarity_kl` and from the loss's constructor."""
    options, error, match = case
    x = torch.randn(2, 5, 4)
    with pytest.raises(error, match=match):
        similarity_kl(x, x + 0.1, **options)
    with pytest.raises(error, match=match):
        conv_loss(**options)
