"""The HPM step (medhpm.pretrain.step): how the teacher is queried (full volume or complementary masked
views), the step with each view, and its capture as one graph. References are slow loops written here."""

import numpy as np
import pytest
import torch

from medhpm.models import ViTEncoder
from medhpm.pretrain import EMATeacher, hard_patch_mask, num_masked
from medhpm.pretrain.model import HPMPretrainModel
from medhpm.pretrain.step import (
    default_teacher_views,
    pretrain_iteration,
    step_core,
    teacher_scores,
    teacher_views_used,
    view_partition,
)

IMG, P = (32, 32, 16), 8  # grid (4, 4, 2): N = 32
N = 32


def tiny_model(seed=0):
    torch.manual_seed(seed)
    enc = ViTEncoder(img_size=IMG, patch_size=P, embed_dim=48, depth=2, num_heads=4)
    return HPMPretrainModel(enc, decoder_dim=36, decoder_depth=1, decoder_heads=3)


def batch(b=2, seed=0):
    return torch.rand(b, 1, *IMG, generator=torch.Generator().manual_seed(seed))


def ranks(b=2, seed=1):
    return torch.rand(b, N, generator=torch.Generator().manual_seed(seed))


def test_default_views_keep_the_students_visible_share():
    assert default_teacher_views(0.75) == 4 and default_teacher_views(0.9) == 10
    assert default_teacher_views(0.5) == 2 and default_teacher_views(0.3) == 2  # at least two views
    assert teacher_views_used("full", 7, 0.75) == 1
    assert teacher_views_used("masked", 0, 0.75) == 4 and teacher_views_used("masked", 3, 0.75) == 3
    with pytest.raises(ValueError, match="full, masked"):
        teacher_views_used("partial", 0, 0.75)


@pytest.mark.parametrize("views", [2, 4, 8])
def test_each_token_is_visible_in_exactly_one_view(views):
    ids = view_partition(ranks(b=3), views)  # N = 32 divides by 2, 4, 8
    assert ids.shape == (3, views, N // views)
    for b in range(3):
        seen = sorted(ids[b].flatten().tolist())
        assert seen == list(range(N))  # each token once, in one view
        for v in range(views):
            assert ids[b, v].tolist() == sorted(ids[b, v].tolist())  # ascending, as the student's ids
    # a different sample gets a different partition, the same ranks the same one
    assert not torch.equal(ids[0], ids[1])
    assert torch.equal(view_partition(ranks(b=3), views), ids)


def test_tokens_beyond_the_groups_are_visible_in_no_view():
    ids = view_partition(ranks(b=2), 5)  # 32 = 5 x 6 + 2
    assert ids.shape == (2, 5, 6)
    for b in range(2):
        flat = ids[b].flatten().tolist()
        assert len(set(flat)) == 30  # no token twice
    with pytest.raises(ValueError, match="2 to N=32 views"):
        view_partition(ranks(), 1)


def _slow_view_scores(model, x, ids):
    """One view at a time, one sample at a time: encoder on the view's visible tokens, decoder sequence,
    predictor at every position; then the mean over the views that mask each token."""
    b, v, _ = ids.shape
    out = torch.zeros(b, N, dtype=torch.float64)
    for i in range(b):
        total, count = torch.zeros(N, dtype=torch.float64), torch.zeros(N, dtype=torch.float64)
        for g in range(v):
            keep = ids[i, g][None]  # (1, K)
            latent = model.forward_encoder(x[i : i + 1], keep)
            lp = model.forward_predictor(model.decoder_input(latent, keep), None)[0].double()  # (N,)
            masked = torch.ones(N, dtype=torch.bool)
            masked[keep[0]] = False
            total += torch.where(masked, lp, 0.0)
            count += masked.double()
        out[i] = total / count
    return out


@pytest.mark.parametrize("views", [2, 4, 5])
def test_masked_view_scores_are_the_mean_over_the_views_that_mask_a_token(views):
    model = tiny_model().eval()
    x, noise = batch(), ranks()
    with torch.no_grad():
        got = teacher_scores(model, x, "masked", views, noise)
        ref = _slow_view_scores(model, x, view_partition(noise, views))
    assert got.dtype == torch.float32 and got.shape == (2, N)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)
    # the teacher's scores differ from the full view's: another question is asked
    assert not torch.allclose(got, teacher_scores(model, x, "full"), atol=1e-3)


def test_full_view_is_the_whole_volume_pass():
    """``full`` is the paper's query: encoder on every token, projection + position, predictor, mean head."""
    model = tiny_model().eval()
    x = batch()
    with torch.no_grad():
        tokens = model.encoder.patch_embed(x) + model.encoder.pos_embed
        for blk in model.encoder.blocks:
            tokens = blk(tokens)
        seq = model.decoder_embed(model.encoder.norm(tokens)) + model.decoder_pos_embed
        for blk in model.predictor_blocks:
            seq = blk(seq)
        ref = model.predictor_pred(model.predictor_norm(seq)).mean(-1)
        got = teacher_scores(EMATeacher(model), x, "full")
    assert torch.equal(got, ref)


def _old_step(student, teacher, x, noise, n_hard, mask_ratio=0.75):
    """The step as it was before the teacher view existed: full-volume teacher pass, mask, student."""
    with torch.no_grad():
        scores = teacher.model.predict_difficulty(x)
    mask = hard_patch_mask(scores, mask_ratio, 0.0, noise=noise, n_hard=n_hard)
    out = student(x, mask, num_masked(N, mask_ratio))
    return out["loss_rec"] + out["loss_pred"], mask


def test_full_view_step_is_the_previous_step_bit_for_bit():
    student = tiny_model()
    teacher = EMATeacher(tiny_model(seed=1))
    x, noise, n_hard = batch(), ranks(seed=3), torch.tensor(12)
    loss, parts = step_core(student, teacher, x, noise, n_hard, 0.75, 1.0, True, "full", 1, None)
    ref_loss, ref_mask = _old_step(student, teacher, x, noise, n_hard)
    assert torch.equal(parts["mask"], ref_mask) and torch.equal(loss, ref_loss)


def test_masked_view_step_mines_the_teachers_highest_masked_view_scores():
    student, teacher = tiny_model(), EMATeacher(tiny_model(seed=1))
    x, noise, vnoise = batch(), ranks(seed=3), ranks(seed=4)
    loss, logs = pretrain_iteration(
        student,
        teacher,
        x,
        alpha=0.5,
        mask_ratio=0.75,
        lambda_pred=1.0,
        use_pred=True,
        noise=noise,
        view="masked",
        views=4,
        view_noise=vnoise,
    )
    assert logs["n_hard"] == 12 and torch.isfinite(loss)
    scores = teacher_scores(teacher, x, "masked", 4, vnoise)
    assert torch.equal(logs["_scores"], scores)
    for b in range(2):
        top = torch.topk(scores[b], 12).indices
        assert logs["_mask"][b, top].all()  # the 12 hardest by the masked views are masked
        assert int(logs["_mask"][b].sum()) == 24


@pytest.mark.parametrize("view", ["full", "masked"])
def test_step_is_one_graph_for_either_view(view):
    """torch.compile(fullgraph=True) captures the whole step (teacher pass included) without a break;
    the captured step gives the eager one's loss and mask."""
    torch._dynamo.reset()
    student, teacher = tiny_model(), EMATeacher(tiny_model(seed=1))
    x, noise, vnoise, n_hard = batch(), ranks(seed=3), ranks(seed=4), torch.tensor(12)
    args = (student, teacher, x, noise, n_hard, 0.75, 1.0, True, view, 4, vnoise if view == "masked" else None)
    compiled = torch.compile(step_core, fullgraph=True, backend="eager")
    loss_c, parts_c = compiled(*args)
    loss_e, parts_e = step_core(*args)
    assert torch.equal(parts_c["mask"], parts_e["mask"])
    torch.testing.assert_close(loss_c, loss_e)


def test_masked_views_are_scored_in_float32_under_bf16_autocast():
    model = tiny_model().eval()
    x, noise = batch(), ranks()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = teacher_scores(model, x, "masked", 4, noise)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, teacher_scores(model, x, "masked", 4, noise))


def test_more_views_per_batch_is_one_encoder_call():
    """The V views of a batch run as one batch of B*V sequences through the encoder."""
    model = tiny_model().eval()
    calls = []
    handle = model.encoder.register_forward_hook(lambda m, i, o: calls.append(tuple(o[0].shape)))
    with torch.no_grad():
        teacher_scores(model, batch(), "masked", 4, ranks())
    handle.remove()
    assert calls == [(8, N // 4, 48)]
    assert np.prod(calls[0][:2]) == 2 * N  # every token of both samples once
