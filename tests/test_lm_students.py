"""lightlm.artefacts.lm_students: chapter 8's recipes, and their runs trained once and cached.

The KD loss is checked against ``distill.topk_kd_loss``, the cached runs against runs retrained from scratch (an
off-policy student, and an on-policy continuation that runs the real teacher). The tests skip when the cached
SmolLM2, its top-k cache or the runs are cold (scripts/test.sh warms them).
"""

import pytest
import torch

from lightlm import distill
from lightlm.artefacts import lm_cache, lm_students

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def recipe(smollm2, lm_students_ready):
    return lm_students.LMRecipe(lm_cache.load_lm_cache(progress=False), smollm2[1])


def test_the_forward_kd_loss_is_distills_top_k_loss_with_a_tail_bucket(recipe):
    rows = torch.arange(4)
    logits = torch.randn(4, recipe.train_ids.shape[1], recipe.config.vocab_size, generator=torch.Generator()
                         .manual_seed(0))
    reference = distill.topk_kd_loss(logits, recipe.topk_values[rows], recipe.topk_indices[rows], tail="bucket")
    torch.testing.assert_close(recipe.kd_loss_on(logits, rows, "forward"), reference, rtol=1e-4, atol=1e-5)


def test_the_text_recipes_are_the_causal_lm_loss_on_their_own_text(recipe):
    model, rows = recipe.new_student(0), torch.arange(3)
    with torch.no_grad():
        for name, ids in (("text (cross-entropy)", recipe.train_ids), ("sequence-level KD", recipe.generated_ids)):
            logits = model(ids[rows])
            by_hand = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[rows, 1:].flatten())
            torch.testing.assert_close(recipe.loss_fn(name)(model, rows), by_hand)


def test_an_unknown_recipe_is_refused(recipe):
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe.loss_fn("logit KD")


def test_load_rejects_what_is_not_a_recipe():
    with pytest.raises(TypeError, match="LMRecipe"):
        lm_students.load_lm_students({"students": {}})


def _largest_difference(a, b) -> float:
    other = b.state_dict()
    return max((value - other[name]).abs().max().item() for name, value in a.state_dict().items())


def test_the_cached_runs_are_what_the_recipes_train(recipe):
    lm_students.load_lm_students(recipe, progress=False)
    seeds = lm_students.SETTINGS["seeds"]
    assert set(recipe.students) == {(name, seed) for name in lm_students.RECIPES for seed in seeds}
    assert set(recipe.continued) == {(arm, seed) for arm in lm_students.ARMS for seed in seeds}
    before = torch.get_num_threads()
    fresh, curve = recipe.train_student("token-level KD, reverse KL", 2)
    assert torch.get_num_threads() == before  # training pins its threads and gives them back
    # equal up to the rounding of another thread history (pytest changes the thread count between modules);
    # another seed's student is far further away, so the check can fail
    torch.testing.assert_close(torch.tensor(curve), torch.tensor(recipe.curves["token-level KD, reverse KL", 2]),
                               rtol=1e-3, atol=0)
    for seed, near in ((2, True), (1, False)):
        assert (_largest_difference(fresh, recipe.students["token-level KD, reverse KL", seed]) < 0.01) == near
    # an on-policy continuation: the student samples, the real teacher scores, at every step
    continued = recipe.continue_student("+ on-policy KD", 0, recipe.students["text (cross-entropy)", 0])
    assert _largest_difference(continued, recipe.continued["+ on-policy KD", 0]) < 0.01
    assert _largest_difference(continued, recipe.continued["+ off-policy KD", 0]) > 0.01
    start = recipe.students["text (cross-entropy)", 0].state_dict()
    assert any(not torch.equal(value, start[name]) for name, value in continued.state_dict().items())


def test_fewer_steps_are_the_first_steps_of_a_run(recipe):
    lm_students.load_lm_students(recipe, progress=False)
    _, first = recipe.train_student("sequence-level KD", 0, steps=3)
    torch.testing.assert_close(torch.tensor(first), torch.tensor(recipe.curves["sequence-level KD", 0][:3]),
                               rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="steps"):
        recipe.train_student("sequence-level KD", 0, steps=0)
