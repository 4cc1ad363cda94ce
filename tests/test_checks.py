"""lightlm._checks: the shared argument checks. Wrong type -> TypeError, wrong value -> ValueError, and the
message names the argument, what was given and what is allowed."""

import math

import numpy as np
import pytest
import torch

from lightlm._checks import check_bool, check_callable, check_choice, check_int, check_module, check_real, check_tensor


def test_accepted_values_come_back_as_plain_python_numbers():
    assert check_int("n", np.int64(3), min=1) == 3 and type(check_int("n", np.int64(3))) is int
    assert check_real("x", 2) == 2.0 and type(check_real("x", np.float32(0.5))) is float
    assert check_real("x", math.inf, finite=False) == math.inf
    assert check_bool("flag", False) is False
    assert check_choice("mode", "b", ("a", "b")) == "b"
    tensor = torch.zeros(2, 3, dtype=torch.int32)
    assert check_tensor("ids", tensor, kind="int", ndim=(1, 2)) is tensor
    assert check_tensor("mask", tensor.bool(), kind="bool", min_ndim=2).dtype == torch.bool


def test_open_and_closed_bounds():
    assert check_real("p", 0.0, min=0, max=1) == 0.0
    assert check_real("p", 1.0, min=0, max=1) == 1.0
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\), got 0.0"):
        check_real("p", 0.0, min=0, max=1, min_open=True, max_open=True)
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\), got 1.0"):
        check_real("p", 1.0, min=0, max=1, min_open=True, max_open=True)
    with pytest.raises(ValueError, match="eps must be > 0, got 0.0"):
        check_real("eps", 0.0, min=0, min_open=True)
    with pytest.raises(ValueError, match="n must be <= 3, got 4"):
        check_int("n", 4, max=3)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: check_int("steps", True), TypeError, "steps must be an int, got bool"),
        (lambda: check_int("steps", 2.0), TypeError, "steps must be an int, got float"),
        (lambda: check_int("steps", "2"), TypeError, "steps must be an int, got str"),
        (lambda: check_int("steps", 0, min=1), ValueError, "steps must be >= 1, got 0"),
        (lambda: check_int("k", 9, min=1, max=8), ValueError, r"k must be in \[1, 8\], got 9"),
        (lambda: check_real("lr", False), TypeError, "lr must be a real number, got bool"),
        (lambda: check_real("lr", "1e-3"), TypeError, "lr must be a real number, got str"),
        (lambda: check_real("lr", 1j), TypeError, "lr must be a real number, got complex"),
        (lambda: check_real("lr", torch.tensor(1.0)), TypeError, "lr must be a real number, got Tensor"),
        (lambda: check_real("lr", math.nan), ValueError, "lr must be a number, got nan"),
        (lambda: check_real("lr", math.nan, finite=False), ValueError, "lr must be a number, got nan"),
        (lambda: check_real("lr", -math.inf), ValueError, "lr must be finite, got -inf"),
        (lambda: check_real("lr", -1.0, min=0), ValueError, "lr must be >= 0, got -1.0"),
        (lambda: check_bool("flag", 1), TypeError, "flag must be True or False, got int"),
        (lambda: check_bool("flag", torch.tensor(True)), TypeError, "flag must be True or False, got Tensor"),
        (lambda: check_choice("tail", "drop", ("renormalise", "bucket")), ValueError,
         "tail must be one of 'renormalise', 'bucket'; got 'drop'"),
        (lambda: check_choice("tail", ["bucket"], {"bucket"}), ValueError,
         r"tail must be one of 'bucket'; got \['bucket'\]"),
        (lambda: check_tensor("x", [1.0]), TypeError, "x must be a torch.Tensor, got list"),
        (lambda: check_tensor("x", torch.ones(2), kind="int"), TypeError,
         "x must be an integer tensor, got dtype torch.float32"),
        (lambda: check_tensor("x", torch.ones(2, dtype=torch.bool), kind="int"), TypeError,
         "x must be an integer tensor, got dtype torch.bool"),
        (lambda: check_tensor("x", torch.ones(2, dtype=torch.long), kind="float"), TypeError,
         "x must be a floating-point tensor, got dtype torch.int64"),
        (lambda: check_tensor("x", torch.ones(2), kind="bool"), TypeError, "x must be a bool tensor"),
        (lambda: check_tensor("x", torch.ones(2), ndim=(2, 3)), ValueError, r"x must be 2-D or 3-D, got shape \(2,\)"),
        (lambda: check_tensor("x", torch.ones(2), min_ndim=2), ValueError,
         r"x must have at least 2 dimensions, got shape \(2,\)"),
        (lambda: check_module("model", "bert"), TypeError, "model must be a torch.nn.Module, got str"),
        (lambda: check_callable("fn", 3), TypeError, "fn must be callable, got int"),
    ],
)
def test_wrong_type_is_a_type_error_and_wrong_value_a_value_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_check_module_names_takes_a_name_or_a_list_and_names_what_is_wrong():
    from lightlm._checks import check_module_names

    assert check_module_names("skip", "lm_head") == ["lm_head"]
    assert check_module_names("skip", ("q_proj", "v_proj")) == ["q_proj", "v_proj"]
    assert check_module_names("skip", [], allow_empty=True) == []
    with pytest.raises(ValueError, match="targets must name at least one module"):
        check_module_names("targets", [])
    with pytest.raises(TypeError, match="targets must be a module name or a list of them, got int"):
        check_module_names("targets", 3)
    with pytest.raises(TypeError, match=r"targets entries must be module names \(non-empty str\), got ''"):
        check_module_names("targets", ["query", ""])


def test_names_module_is_peft_dotted_suffix_rule():
    from lightlm._checks import names_module

    assert names_module("bert.encoder.layer.0.attention.self.query", "query")
    assert names_module("query", "query")
    assert names_module("a.attention.output.dense", "output.dense")
    assert not names_module("a.self.key_query", "query")  # a suffix of the last name is not a dotted suffix
    assert not names_module("a.query.lora_A", "query")
