"""Shared fixtures: the real models are loaded once per test session (per xdist worker).

Also:
* the ``slow`` marker is applied automatically (``pytest_collection_modifyitems``) to every test that loads a
  real model or builds or loads a cached artefact, directly, through a fixture or through a helper of its
  module: ``pytest tests -m "not slow"`` runs the fast library tests only (``bash scripts/test.sh --lib``);
* hypothesis runs derandomized (profile "lightlm": the same examples on every run, no example database);
  ``--hypothesis-profile=explore`` draws new examples.
"""

import ast
import functools
import inspect
import re
import textwrap

import pytest
import torch

try:
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # pinned in requirements.txt; only tests/test_properties.py needs it
    _hypothesis_settings = None
else:
    _hypothesis_settings.register_profile("lightlm", derandomize=True, database=None, deadline=None,
                                          print_blob=True)
    _hypothesis_settings.register_profile("explore", derandomize=False, database=None, deadline=None,
                                          print_blob=True)


def seeded_randn(*shape, seed=0, dtype=torch.float64):
    """A reproducible standard-normal tensor (its own generator), float64 by default."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def seeded_linear(d_in, d_out, seed=0, bias=True, dtype=torch.float64):
    """An nn.Linear with reproducible weights (and bias) from :func:`seeded_randn`."""
    layer = torch.nn.Linear(d_in, d_out, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(seeded_randn(d_out, d_in, seed=seed))  # drawn in float64, then cast
        if bias:
            layer.bias.copy_(seeded_randn(d_out, seed=seed + 1))
    return layer


def tiny_hf(kind: str):
    """A tiny random transformers model (no download) in eval mode, seeded: ``"bert"`` (sequence classification,
    width 32, 2 layers, 4 heads, FFN 64, vocabulary 100), ``"llama"`` (causal LM, width 32, 2 layers, 4 heads and
    2 KV heads, FFN 64, vocabulary 100) or ``"gpt2"`` (GPT-2's Conv1D layers, width 32, 2 layers)."""
    import transformers

    torch.manual_seed(0)
    if kind == "bert":
        config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, vocab_size=100)
        return transformers.BertForSequenceClassification(config).eval()
    if kind == "llama":
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
        return transformers.LlamaForCausalLM(config).eval()
    if kind != "gpt2":
        raise ValueError(f"kind must be 'bert', 'llama' or 'gpt2', got {kind!r}")
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def require_warm(folder, inputs) -> None:
    """Tests read the cached artefacts but never build them into the user's cache (those that build use a
    temporary LIGHTLM_CACHE): a cold or stale artefact skips the test, saying how to build it, or fails it where
    LIGHTLM_REQUIRE_ARTEFACTS=1 (scripts/test.sh sets it after ``python -m lightlm.zoo warm``)."""
    import os

    from lightlm import _cache

    reason = _cache.inspect(folder, inputs)
    if reason is not None:
        message = f"{folder}: {reason}; build it with  python -m lightlm.zoo warm"
        if os.environ.get("LIGHTLM_REQUIRE_ARTEFACTS") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def minilm():
    from lightlm import zoo

    return zoo.load_minilm()


@pytest.fixture(scope="session")
def smollm2():
    from lightlm import zoo

    require_warm(zoo.smollm2_cache_path(), zoo.smollm2_inputs())
    return zoo.load_smollm2(progress=False)


@pytest.fixture(scope="session")
def rt_teacher_ready():
    """Chapter 7's cached teacher is built (and verified) in the cache the tests read."""
    from lightlm.artefacts import teachers

    require_warm(teachers.rt_teacher_path(), teachers.rt_teacher_inputs())


@pytest.fixture(scope="session")
def rt_students_ready(rt_teacher_ready):
    """Chapter 7's cached student runs are built (and verified) in the cache the tests read."""
    from lightlm.artefacts import rt_students

    require_warm(rt_students.rt_students_path(), rt_students.rt_students_inputs())


@pytest.fixture(scope="session")
def lm_students_ready(smollm2):
    """Chapter 8's cached teacher outputs and student runs are built (and verified) in the cache the tests read."""
    from lightlm.artefacts import lm_cache, lm_students

    require_warm(lm_cache.cache_path(), lm_cache.lm_cache_inputs())
    require_warm(lm_students.lm_students_path(), lm_students.lm_students_inputs())


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread (use with ``pytestmark = pytest.mark.usefixtures(...)``):
    tensors this small run fastest on one thread; two contend with each other on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- hooks


def pytest_configure(config):
    if _hypothesis_settings is not None and not config.getoption("hypothesis_profile", None):
        _hypothesis_settings.load_profile("lightlm")


MODEL_FIXTURES = {"minilm", "smollm2"}
# What loads a real model or builds or reads a cached artefact: zoo.load_minilm/load_smollm2, the chapter 7 and 8
# artefacts (teachers.*rt_teacher*, lm_cache.build_lm_cache/load_lm_cache), the SmolLM2 copy
# (zoo.smollm2_cache_path), any build_* builder, warm, from_pretrained of a real checkpoint.
HEAVY_CALL = re.compile(
    r"load_(minilm|smollm2|lm_cache)|\w*rt_teacher\w*|\w+_cache_path|build_\w+|warm\w*|from_pretrained")
HEAVY_CODE = re.compile(rf"\b({HEAVY_CALL.pattern})\s*\(")  # the same calls inside code run by a subprocess


def _is_pytest_raises(node: ast.With) -> bool:
    """``with pytest.raises(...)``: a call there is expected to fail at once, before loading anything."""
    return any(isinstance(item.context_expr, ast.Call) and ast.unparse(item.context_expr.func) == "pytest.raises"
               for item in node.items)


@functools.lru_cache(maxsize=None)
def _loads_a_model(func, depth: int = 0) -> bool:
    """Whether ``func``'s source (or a helper of its module it calls, or a code string it runs) loads a real
    model or builds an artefact."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    except (OSError, TypeError, SyntaxError):
        return False
    for definition in tree.body:  # decorators (parametrize lists) run at collection, not in the test
        if isinstance(definition, (ast.FunctionDef, ast.AsyncFunctionDef)):
            definition.decorator_list = []
    names = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.With) and _is_pytest_raises(node):
            continue
        if isinstance(node, ast.Call):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if HEAVY_CALL.fullmatch(called):
                return True
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and HEAVY_CODE.search(node.value):
            return True
        elif isinstance(node, ast.Name):
            names.add(node.id)
        stack.extend(ast.iter_child_nodes(node))
    module_globals = getattr(func, "__globals__", {})
    for name in names:  # module-level code strings and helpers that the test uses
        value = module_globals.get(name)
        if isinstance(value, str) and HEAVY_CODE.search(value):
            return True
        if (inspect.isfunction(value) and value is not func and depth < 3
                and value.__module__ == getattr(func, "__module__", None) and _loads_a_model(value, depth + 1)):
            return True
    return False


def _is_slow(item: pytest.Function) -> bool:
    if MODEL_FIXTURES & set(item.fixturenames):  # fixturenames is the closure: fixtures of fixtures too
        return True
    if _loads_a_model(item.function):
        return True
    fixture_info = getattr(item, "_fixtureinfo", None)
    definitions = fixture_info.name2fixturedefs.values() if fixture_info is not None else ()
    return any(_loads_a_model(definition.func) for defs in definitions for definition in defs)


def pytest_collection_modifyitems(config, items):
    """Mark as ``slow`` every test that loads a real model or builds an artefact (see ``HEAVY_CALL``)."""
    for item in items:
        if isinstance(item, pytest.Function) and not item.get_closest_marker("slow") and _is_slow(item):
            item.add_marker(pytest.mark.slow)
