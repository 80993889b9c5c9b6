"""§4.4 of the paper (evaluate.py --interpret): the prompt before tuning rebuilt bit for bit for every
learner, the channel-invariance numbers on tensors whose answer is known, CoOp's nearest words, and
Fig. 7 drawn from real runs with the numbers behind it equal to the runs' prompts."""
import contextlib
import json
import os

import pytest
import torch
from PIL import Image

import backbones
import checkpoints
import clip_model
import evaluate
import figures
import prompts
import toy_world
import train_backbone as tb
import train_dpc as td

LEARNERS = ("coop", "coop_random", "maple", "promptsrc", "promptkd")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A run and a DPC run of each learner (CoOp also from random vectors, --ctx-init ''), and the prompt
    each stage-1 learner held when train_backbone.py built it (recorded by wrapping build_learner)."""
    cwd = tmp_path_factory.mktemp("interpret")
    # 4 train and 2 test images a class (the default: 20 and 4): enough for 2 shots; these tests read the
    # prompts, not the accuracies
    toy_world.make_synthetic_imagefolder(str(cwd / "data"), "synthetic", n_train=4, n_val=0, n_test=2)
    common = ["--data", "synthetic", "--root", "data", "--clip", "tiny", "--epochs", "2", "--shots", "2", "--workers",
              "0", "--feature-cache", "off", "--seed", "3"]
    built, real = [], prompts.build_learner

    def recording(*args, **kwargs):
        learner = real(*args, **kwargs)
        built.append({n: t.detach().clone() for n, t in prompts.prompt_tensors(learner).items()})
        return learner

    initial = {}
    with contextlib.chdir(cwd), pytest.MonkeyPatch.context() as mp:
        mp.setattr(prompts, "build_learner", recording)
        tb.main(tb.get_args(common + ["--learner", "promptsrc", "--output-dir", "teacher"]))
        for name in LEARNERS:
            learner = name.split("_")[0]
            flags = (["--ctx-init", ""] if name == "coop_random" else []) + \
                (["--teacher", "teacher", "--batch-size", "4"] if learner == "promptkd" else [])
            tb.main(tb.get_args(common + ["--learner", learner, "--output-dir", name] + flags))
            initial[name] = built[-1]
            td.main(td.get_args(["--backbone", name, "--epochs", "2", "--shots", "2", "--workers", "0",
                                 "--feature-cache", "off", "--output-dir", f"{name}_dpc"]))
    return cwd, initial


@pytest.mark.slow
@pytest.mark.parametrize("name", LEARNERS)
def test_the_prompt_before_tuning_is_rebuilt_bit_for_bit(world, name):
    cwd, initial = world
    learner, backbone = backbones.load_stage1(str(cwd / name), "cpu")
    rebuilt, how = evaluate.initial_prompt(backbone, learner)
    assert how == ("phrase 'a photo of a'" if name in ("coop", "maple", "promptsrc") else "random N(0, 0.02²)")
    assert set(rebuilt) == set(initial[name])
    assert all(torch.equal(rebuilt[n], initial[name][n].float()) for n in rebuilt), name
    tuned = checkpoints.read_checkpoint(str(cwd / name / "checkpoint.pt"))["state"]
    assert any(not torch.equal(tuned[n].float(), rebuilt[n]) for n in rebuilt if n in tuned)   # stage 1 moved it


def test_channel_invariance_of_known_tensors():
    x = torch.randn(3, 64)
    same = figures.channel_invariance(x, x)
    assert same["cosine"] == pytest.approx([1.0] * 3) and same["sign_kept"] == [1.0] * 3
    assert same["rank_correlation"] == pytest.approx([1.0] * 3)
    flipped = figures.channel_invariance(-x, x)
    assert flipped["cosine"] == pytest.approx([-1.0] * 3) and flipped["sign_kept"] == [0.0] * 3
    assert flipped["rank_correlation"] == pytest.approx([-1.0] * 3)
    cubed = figures.channel_invariance(x ** 3, x)          # monotone: every sign and rank kept, cosine < 1
    assert cubed["sign_kept"] == [1.0] * 3 and cubed["rank_correlation"] == pytest.approx([1.0] * 3)
    assert all(c < 0.99 for c in cubed["cosine"])
    half = x.clone()
    half[:, :32] *= -1                                       # half the channels flip sign
    assert figures.channel_invariance(half, x)["sign_kept"] == [0.5] * 3
    shift = figures.invariance(torch.zeros(3, 64), x, x + 0.5 * x)
    assert shift["shift_ratio"] == pytest.approx([0.5] * 3)  # DPC moved each vector half as far as stage 1


def test_nearest_words_find_the_token_a_context_vector_is():
    clip = clip_model.random_clip("tiny", seed=0)
    table = clip.token_embedding.weight.detach()
    ids = clip_model.tokenizer().encode("photo satellite")
    words = figures.nearest_words(table[ids] + 1e-4, table, 3)
    assert [w[0][0] for w in words] == ["photo", "satellite"] and all(w[0][1] < 1e-2 for w in words)
    assert all(len(w) == 3 and w[0][1] <= w[1][1] <= w[2][1] for w in words)


@pytest.mark.slow
@pytest.mark.parametrize("name", LEARNERS)
def test_interpret_draws_fig7_from_the_runs_own_prompts(world, tmp_path, capsys, name):
    cwd, initial = world
    run = str(cwd / f"{name}_dpc")
    out = evaluate.main(evaluate.get_args([run, "--interpret", "--workers", "0", "--out", str(tmp_path), "--words", "4"]))
    ckpt = checkpoints.read_checkpoint(os.path.join(run, "checkpoint.pt"))
    r = out["runs"][0]
    pictured = "visual_prompt" if name == "promptkd" else "ctx"
    parallel = ckpt["parallel_prompt"][pictured]
    assert r["pictured"] == pictured
    assert torch.equal(torch.tensor(r["prompts"]["P"]), ckpt["tuned_prompt"][pictured].float())
    assert torch.equal(torch.tensor(r["prompts"]["P'"]), parallel.float())
    assert torch.equal(torch.tensor(r["prompts"]["initial"]), initial[name][pictured].float())
    assert r["initial"] == ("phrase 'a photo of a'" if name in ("coop", "maple", "promptsrc") else "random N(0, 0.02²)")
    assert ("teacher.ctx" not in r["tensors"]) and pictured in r["tensors"]     # frozen in stage 1: not compared
    assert json.load(open(tmp_path / "interpret.json"))["runs"][0]["prompts"] == r["prompts"]
    assert (len(r["nearest_words"]) == 2 and len(r["nearest_words"]["P"][0]) == 4) if name != "promptkd" \
        else r["nearest_words"] == {}                                          # a visual prompt has no words
    stem = tmp_path / f"fig7_{name.split('_')[0]}_synthetic_seed3"
    m = len(r["prompts"]["P"])
    with Image.open(f"{stem}.png") as image:
        assert image.size == (960, round((1.3 * m + 1.2) * 150))
    assert open(f"{stem}.pdf", "rb").read(5) == b"%PDF-"
    printed = capsys.readouterr().out
    assert f"§4.4 {name.split('_')[0]} + DPC, synthetic seed 3" in printed and "mean over" in printed


def test_interpret_needs_a_dpc_run(world, tmp_path, capsys):
    cwd, _ = world
    with pytest.raises(SystemExit) as exit_:
        evaluate.run([str(cwd / "coop"), "--interpret", "--workers", "0", "--out", str(tmp_path / "ev")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err == ["error: --interpret needs DPC runs (train_dpc.py): P' exists only there"]
