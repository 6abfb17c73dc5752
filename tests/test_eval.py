"""Metrics on constructed cases with known answers, `wgen eval`, and `wgen demo`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from wgen.baselines import noisy
from wgen.metrics import ensemble_curve, error_iou, mean_disagreement, per_model_metrics

from conftest import make_state


def test_per_model_metrics_known_values() -> None:
    labels = torch.tensor([0, 1, 1, 0])
    confident_right = torch.tensor([[9.0, -9.0], [-9.0, 9.0], [-9.0, 9.0], [9.0, -9.0]])
    half_wrong = torch.tensor([[9.0, -9.0], [9.0, -9.0], [-9.0, 9.0], [-9.0, 9.0]])
    m = per_model_metrics(torch.stack([confident_right, half_wrong]), labels)
    assert m["accuracy"].tolist() == [1.0, 0.5]
    assert m["nll"][0] < 1e-6 and m["nll"][1] == pytest.approx(9.0, abs=1e-3)
    assert m["ece"][0] < 1e-6 and m["ece"][1] == pytest.approx(0.5, abs=1e-4)  # confident, half right


def test_identical_models_disagree_nowhere_and_copy_each_others_errors() -> None:
    logits = torch.randn(1, 50, 4).repeat(3, 1, 1)
    labels = torch.randint(4, (50,))
    assert mean_disagreement(logits) == 0.0
    errors = logits.argmax(-1) != labels
    assert torch.equal(error_iou(errors, errors), torch.ones(3, 3, dtype=torch.float64))
    assert error_iou(torch.zeros(1, 5, dtype=torch.bool), torch.zeros(1, 5, dtype=torch.bool)).item() == 1.0
    opposite = torch.tensor([[True, False]]), torch.tensor([[False, True]])
    assert error_iou(*opposite).item() == 0.0


def test_disagreement_of_two_models_that_differ_on_half() -> None:
    a = torch.tensor([[5.0, 0.0]] * 4)
    b = torch.tensor([[5.0, 0.0]] * 2 + [[0.0, 5.0]] * 2)
    assert mean_disagreement(torch.stack([a, b])) == pytest.approx(0.5)


def test_ensemble_curve_sizes_and_values() -> None:
    labels = torch.tensor([0, 1])
    right = torch.tensor([[4.0, 0.0], [0.0, 4.0]])
    wrong = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    curve = ensemble_curve(torch.stack([wrong, right, right]), labels)
    assert [p["size"] for p in curve] == [1, 2, 3]
    assert [p["accuracy"] for p in curve] == [0.0, 1.0, 1.0]


def test_noise_baseline_distance_grows_with_scale() -> None:
    states = [make_state(seed=i) for i in range(3)]
    keys = sorted(k for k, v in states[0].items() if v.is_floating_point() and "running" not in k)
    distances = []
    for scale in (0.01, 0.1, 0.3):
        noisy_states = noisy(states, 6, scale, keys, torch.Generator().manual_seed(0))
        distances.append(min(sum(float((n[k] - s[k]).pow(2).sum()) for k in keys) ** 0.5
                             for n in noisy_states for s in states))
    assert distances[0] < distances[1] < distances[2]


def _two_members(spec) -> list[dict[str, torch.Tensor]]:
    """Two members told apart by value: every float of the first is 0, of the second 1."""
    state = make_state(spec)
    return [{k: torch.full_like(v, float(i)) if v.is_floating_point() else v for k, v in state.items()} for i in (0, 1)]


@pytest.mark.parametrize("arch", ["test_resnet", "test_vit"])
def test_a_unit_mosaic_takes_each_unit_whole_from_one_member(arch: str) -> None:
    from wgen.baselines import _unit_owners, unit_mosaics
    from wgen.checkpoints import ModelSpec
    from wgen.permute.groups import derive_groups

    spec = ModelSpec(arch, 10, {"img_size": 32, "patch_size": 8} if arch == "test_vit" else {})
    groups = derive_groups(spec.create(), (3, 32, 32))
    owners = _unit_owners(groups)
    mosaics = unit_mosaics(_two_members(spec), 8, groups, torch.Generator().manual_seed(0))
    mixed = 0
    for mosaic in mosaics:
        for key, (axis, _, unit) in owners.items():
            donor = mosaic[key].movedim(axis, 0).reshape(len(unit), -1)  # one row per index of the owning axis
            assert torch.equal(donor.amin(1), donor.amax(1)), key  # a slice is one member's
            for u in unit.unique():
                assert len(donor[unit == u, 0].unique()) == 1, (key, int(u))  # a unit (a head) is one member's
            mixed += len(donor[:, 0].unique()) == 2
    assert mixed > len(owners) * 4  # and units of one tensor come from both members
    if arch == "test_vit":
        assert any(len(unit.unique()) < len(unit) for _, _, unit in owners.values())  # heads span rows
        qkv = mosaics[0]["blocks.0.attn.qkv.weight"].reshape(3, -1, mosaics[0]["blocks.0.attn.qkv.weight"].shape[1])
        assert torch.equal(qkv[0, :, 0], qkv[2, :, 0])  # a head's q and v rows come from the same member


def test_eval_reports_every_metric_for_every_set(chain: dict[str, Path], tmp_path: Path, run_cli) -> None:
    report_path, plot_path = tmp_path / "report.json", tmp_path / "report.png"
    result = run_cli("eval", chain["samples"], "--zoo", chain["canon"], "-d", "digits", "--out", report_path,
                     "--plot", plot_path, "--noise-scales", "0.01,0.3", "--soup-k", "2")
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    written = len(list(chain["samples"].glob("sample-*")))  # a sample rejected as a blend is not written
    baselines = ["noise 0.01", "noise 0.3", "gaussian", "interpolation", "soup of 2", "unit mosaic"]
    assert list(report["sets"]) == ["samples", "samples + BN", "zoo", "held-out",
                                    *(name + suffix for name in baselines for suffix in ("", " + BN"))]
    for name, s in report["sets"].items():
        for key in ("accuracy", "nll", "ece", "ensemble", "disagreement", "nn_ratio", "max_error_iou",
                    "max_agreement", "copy_rate"):
            assert key in s, (name, key)
        assert s["models"] == {"zoo": 5, "held-out": 1}.get(name, written)
        assert s["baseline"] == (name.removesuffix(" + BN") in baselines)
        if name != "zoo":
            assert "holdout_nearer" in s
    assert report["sets"]["zoo"]["nn_ratio"]["mean"] == pytest.approx(1.0)
    assert report["calibrated_on"] is None  # these samples kept the statistics they were decoded with
    sets = report["sets"]
    assert sets["noise 0.01"]["nn_distance"]["mean"] < sets["noise 0.3"]["nn_distance"]["mean"]
    assert sets["held-out"]["holdout_nearer"] == 1.0  # a held-out member is nearest to itself
    bars = report["yardstick"]
    assert bars["source"] == "held-out" and bars["accuracy_bar"] == pytest.approx(sets["held-out"]["accuracy"]["mean"] - 0.01)
    assert bars["agreement_bar"] == pytest.approx(sets["held-out"]["max_agreement"]["median"])
    assert list(report["headline"]) == ["samples", "samples + BN", "held-out",
                                        *(name + suffix for name in baselines for suffix in ("", " + BN"))]
    assert report["headline"]["held-out"] == {"0.3": 1.0, "0.5": 1.0, "0.8": 1.0}  # one member: it sets both bars
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rejected = 8 - written
    assert report["sampling"] == {"asked": 8, "rejected": rejected,
                                  "reasons": {"a blend of members": rejected} if rejected else {},
                                  "solver": "rk4", "steps": 5, "projected": True}
    text = " ".join(result.stdout.split())
    reasons = f" ({rejected} a blend of members)" if rejected else ""
    assert f"samples: 8 asked, {rejected} rejected{reasons}: the sets above hold the rest" in text
    assert "accurate (>=" in text
    # the recorded test accuracy of each zoo member is what eval measures for it
    zoo_json = json.loads((chain["canon"] / "zoo.json").read_text())
    generator = json.loads((chain["gen"] / "config.json").read_text())
    recorded = {m["name"]: m["test_accuracy"] for m in zoo_json["members"]}
    measured = dict(zip(generator["members"]["train"], report["sets"]["zoo"]["per_model_accuracy"]))
    for name, accuracy in measured.items():
        assert accuracy == pytest.approx(recorded[name], abs=1e-6)


def test_accurate_and_novel_counts_both_bars() -> None:
    from wgen.novelty import accurate_and_novel

    accuracy = torch.tensor([0.9, 0.9, 0.7, 0.9])
    measures = {"nn_ratio": torch.tensor([0.9, 0.4, 0.9, 0.9]), "max_agreement": torch.tensor([0.8, 0.8, 0.8, 0.95])}
    shares = accurate_and_novel(accuracy, measures, accuracy_bar=0.85, agreement_bar=0.9, thresholds=(0.3, 0.5))
    assert shares == {"0.3": 0.5, "0.5": 0.25}  # the second is too near, the third too weak, the fourth agrees too much


def test_a_permuted_copy_is_not_new(chain: dict[str, Path]) -> None:
    from wgen.checkpoints import open_zoo
    from wgen.novelty import nearest_distances, reference
    from wgen.permute.groups import derive_groups
    from wgen.permute.match import apply_alignment, random_alignment

    zoo = open_zoo(chain["canon"])
    states = [zoo.load(m) for m in zoo.members]
    keys = sorted(k for k, _ in zoo.spec.create().named_parameters())
    spec = derive_groups(zoo.spec.create(), (3, 32, 32))
    train, copy = states[:5], states[5]
    permuted = apply_alignment(copy, random_alignment(spec, copy, torch.Generator().manual_seed(1)))
    plain = reference(train + [copy], [], torch.zeros(6, 2, 10), torch.zeros(2, dtype=torch.long), keys, spec, 0)
    rematched = reference(train + [copy], [], torch.zeros(6, 2, 10), torch.zeros(2, dtype=torch.long), keys, spec, 3)
    assert float(nearest_distances([permuted], plain)[0]) > 0.5 * plain.nn_distance  # plain L2 is fooled
    assert float(nearest_distances([permuted], rematched)[0]) < 1e-4  # re-matching finds the copy


def test_eval_of_a_zoo_alone(chain: dict[str, Path], run_cli) -> None:
    result = run_cli("eval", chain["zoo"], "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert list(report["sets"]) == ["models"] and report["data"] == "digits"
    assert "nn_ratio" not in report["sets"]["models"] and "headline" not in report


def test_eval_with_a_mismatching_zoo(chain: dict[str, Path], tmp_path: Path, run_cli) -> None:
    from conftest import write_test_member
    from wgen.checkpoints import ModelSpec

    write_test_member(tmp_path / "other" / "a", ModelSpec("test_resnet", 3, {}))
    result = run_cli("eval", chain["samples"], "--zoo", tmp_path / "other")
    assert result.exit_code == 2
    assert "pass the zoo the generator was trained on" in result.stderr


@pytest.mark.slow
def test_demo_runs_the_chain_and_resumes(tmp_path: Path) -> None:
    from wgen.demo import DemoSettings, run_demo

    class Notes:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def stage(self, name, total, done=0): ...
        def advance(self, count=1, status=""): ...
        def note(self, text):
            self.lines.append(text)

    settings = DemoSettings(members=3, epochs=1, train_epochs=0.2, samples=4)
    notes = Notes()
    report = run_demo(tmp_path, torch.device("cpu"), settings, progress=notes)
    assert [n.split()[1] for n in notes.lines if n.startswith("==>")] == ["zoo", "canonicalize", "train", "sample", "eval"]
    assert (tmp_path / "report.png").is_file() and set(report["sets"]) >= {"zoo", "samples", "held-out"}
    assert report["data"] == "digits-hard" and report["sets"]["held-out"]["models"] == 1 and report["examples"] == 3590
    before = (tmp_path / "samples" / "manifest.json").read_text()
    run_demo(tmp_path, torch.device("cpu"), settings)  # resumes: finished stages are kept
    assert (tmp_path / "samples" / "manifest.json").read_text() == before


def test_ensemble_predict_example_runs_on_samples(chain: dict[str, Path]) -> None:
    import subprocess
    import sys

    script = Path(__file__).parent.parent / "examples" / "ensemble_predict.py"
    done = subprocess.run([sys.executable, str(script), str(chain["samples"]), "--count", "3"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "3 models; input (3, 32, 32)" in done.stdout
    assert done.stdout.count("predicted:") == 1


def test_eval_refuses_a_zoo_the_generator_was_not_trained_on(chain: dict[str, Path], run_cli) -> None:
    result = run_cli("eval", chain["samples"], "--zoo", chain["zoo"])  # the raw zoo, not the canonical one
    assert result.exit_code == 2
    assert f"{chain['zoo']} is not the zoo the generator was trained on" in " ".join(result.stderr.split())


def test_eval_counts_rejected_samples_by_reason(tiny_generator: Path, random_zoo: Path, tmp_path: Path,
                                                run_cli) -> None:
    assert run_cli("sample", tiny_generator, "-n", "6", "-o", tmp_path / "all", "--min-radius", "0").exit_code == 0
    radii = [e["radius"] for e in json.loads((tmp_path / "all" / "manifest.json").read_text())["samples"]]
    blends = sum(r < 0.99 for r in radii)
    assert 0 < blends < 6, radii  # a 20-step generator leaves some end points inside the members' sphere
    samples = tmp_path / "samples"
    assert run_cli("sample", tiny_generator, "-n", "6", "-o", samples, "--min-radius", "0.99").exit_code == 0
    result = run_cli("eval", samples, "--zoo", random_zoo, "-d", "digits", "--no-baselines", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["sampling"]["rejected"] == blends and report["sampling"]["reasons"] == {"a blend of members": blends}
    assert report["sets"]["samples"]["models"] == 6 - blends


def test_batchnorm_reestimated_channels_last_equals_the_plain_layout(chain: dict[str, Path]) -> None:
    from wgen.checkpoints import open_zoo
    from wgen.data import SplitSpec, load_data
    from wgen.metrics import recalibrated, reestimate_batchnorm

    zoo = open_zoo(chain["zoo"])
    states = [zoo.load(m) for m in zoo.members[:2]]
    data = load_data("digits", (3, 32, 32), SplitSpec())
    fast = recalibrated(zoo.spec, states, data, torch.device("cpu"))  # channels-last on CPU
    x = next(iter(data.batches("val", 128)))[0]
    for state, got in zip(states, fast):
        model = zoo.spec.create()
        model.load_state_dict(state)
        assert reestimate_batchnorm(model, data, torch.device("cpu"))
        for key, want in model.state_dict().items():
            assert got[key].is_contiguous()
            torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-5)
        want_out = model.eval()(x)
        model.load_state_dict(got)
        scale = want_out.abs().max().item()  # float sums in another order: the tolerance canonicalization checks
        torch.testing.assert_close(model(x), want_out, rtol=0, atol=1e-4 * scale)
        assert not torch.equal(got["bn1.running_var"], state["bn1.running_var"])  # the statistics did change


def test_ensemble_draws_average_random_subsets() -> None:
    from wgen.metrics import draw_summary, ensemble_hits

    labels = torch.zeros(20, dtype=torch.long)
    right, wrong = torch.tensor([5.0, 0.0]).expand(20, 2), torch.tensor([0.0, 5.0]).expand(20, 2)
    draws = draw_summary(ensemble_hits(torch.stack([right, wrong]), labels, size=1, draws=400))
    assert draws is not None and draws["min"] == 0.0 and draws["max"] == 1.0 and draws["draws"] == 400
    assert 0.4 < draws["mean"] < 0.6  # each single-model draw is the right model half the time
    four = torch.stack([right, right, right, wrong * 2])  # three right models and a surer wrong one
    assert draw_summary(ensemble_hits(four, labels, size=3))["mean"] == 1.0  # a majority of every 3 is right
    assert ensemble_hits(four, labels, size=5) is None and draw_summary(None) is None  # fewer models than asked


def test_grouped_bootstrap_resamples_whole_groups() -> None:
    from wgen.metrics import grouped_bootstrap

    differences = torch.cat([torch.ones(50), torch.zeros(50)])
    apart = grouped_bootstrap(differences, torch.arange(100))  # 100 independent examples
    assert apart["difference"] == 0.5 and apart["groups"] == 100
    assert 0.35 < apart["ci95"][0] < 0.45 and 0.55 < apart["ci95"][1] < 0.65
    together = grouped_bootstrap(differences, torch.arange(100) // 50)  # two groups of 50 alike examples
    assert together["groups"] == 2 and together["ci95"] == [0.0, 1.0]  # only 2 originals: nothing is known
    constant = grouped_bootstrap(torch.full((30,), 0.25), torch.arange(30) // 3)
    assert constant["ci95"] == pytest.approx([0.25, 0.25])


def test_grouped_bootstrap_in_chunks_draws_what_it_draws_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from wgen import metrics

    differences, groups = torch.randn(300, generator=torch.Generator().manual_seed(0)), torch.arange(300) // 2
    at_once = metrics.grouped_bootstrap(differences, groups)
    monkeypatch.setattr(metrics, "BOOTSTRAP_INDICES", 7 * 150)  # 7 resamples of 150 groups a chunk, the last short
    assert metrics.grouped_bootstrap(differences, groups) == at_once


def test_eval_reports_the_ensemble_gap_to_the_matched_noise(tiny_generator: Path, random_zoo: Path, tmp_path: Path,
                                                           run_cli) -> None:
    samples = tmp_path / "samples"
    assert run_cli("sample", tiny_generator, "-n", "16", "-o", samples, "--min-radius", "0").exit_code == 0
    result = run_cli("eval", samples, "--zoo", random_zoo, "-d", "digits", "--noise-scales", "0.05",
                     "--out", tmp_path / "report.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    sets, gap = report["sets"], report["ensemble_gap"]
    assert report["matched_noise"] == {"raw": "noise 0.05", "bn": "noise 0.05 + BN"}
    for key, suffix in (("raw", ""), ("bn", " + BN")):
        ours, theirs = sets["samples" + suffix], sets["noise 0.05" + suffix]
        assert gap[key]["noise"] == "noise 0.05" + suffix
        first, drawn = gap[key]["first_16"], gap[key]["mean_of_draws"]
        assert first["difference"] == pytest.approx(ours["ensemble_16"] - theirs["ensemble_16"], abs=1e-6)
        assert drawn["difference"] == pytest.approx(ours["ensemble_16_draws"]["mean"]
                                                    - theirs["ensemble_16_draws"]["mean"], abs=1e-6)
        for g in (first, drawn):
            assert g["ci95"][0] <= g["difference"] <= g["ci95"][1] and g["groups"] == 359
    text = " ".join(result.stdout.split())
    assert "ensemble of 16, samples minus noise 0.05: first 16" in text and "resampling 359 groups of examples" in text


def test_a_baseline_cache_gives_the_report_an_uncached_eval_gives(tiny_generator: Path, random_zoo: Path,
                                                                   tmp_path: Path, run_cli,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    samples, cache = tmp_path / "samples", tmp_path / "cache"
    assert run_cli("sample", tiny_generator, "-n", "16", "-o", samples, "--min-radius", "0").exit_code == 0

    def report(name: str, *extra: object) -> dict:
        result = run_cli("eval", samples, "--zoo", random_zoo, "-d", "digits", "--noise-scales", "0.05,0.3",
                         "--rematch", "1", "--out", tmp_path / f"{name}.json", *extra)
        assert result.exit_code == 0, result.output
        return json.loads((tmp_path / f"{name}.json").read_text())

    def judged(r: dict) -> dict:
        return {k: r[k] for k in ("sets", "matched_noise", "headline", "ensemble_gap")}

    plain = report("plain")
    assert plain["baselines_from_cache"] == 0
    first = report("first", "--baseline-cache", cache)
    assert first["baselines_from_cache"] == 0 and judged(first) == judged(plain)
    entries = sorted(cache.glob("*/*.safetensors"))
    assert [p.name for p in entries] == ["00-noise-0.05.safetensors", "01-noise-0.3.safetensors",
                                         "02-gaussian.safetensors", "03-interpolation.safetensors",
                                         "04-soup-of-3.safetensors", "05-unit-mosaic.safetensors"]
    for path in entries[1:]:  # as if killed after the first set: the rest draw on from its generator state
        path.unlink()
    resumed = report("resumed", "--baseline-cache", cache)
    assert resumed["baselines_from_cache"] == 1 and judged(resumed) == judged(plain)

    from wgen import baselines

    def never(*_: object, **__: object) -> None:
        raise AssertionError("a cached baseline was built again")

    for name in ("noisy", "gaussian", "interpolations", "soups", "unit_mosaics"):
        monkeypatch.setattr(baselines, name, never)
    cached = report("cached", "--baseline-cache", cache)
    assert cached["baselines_from_cache"] == 6 and judged(cached) == judged(plain)
    monkeypatch.undo()
    other = report("other", "--baseline-cache", cache, "--seed", "1")  # other baselines: a key of their own
    assert other["baselines_from_cache"] == 0 and len(list(cache.glob("*/key.json"))) == 2


def test_a_baseline_cache_is_a_wgen_folder_outside_the_inputs(random_zoo: Path, tmp_path: Path, run_cli) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    for cache, message in ((theirs, f"{theirs}: exists and was not written by wgen"),
                           (random_zoo / "cache", "the output may not be, contain or lie inside the input")):
        result = run_cli("eval", random_zoo, "--zoo", random_zoo, "-d", "digits", "--baseline-cache", cache)
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.stderr.split())
    assert (theirs / "notes.txt").read_text() == "mine" and not (random_zoo / "cache").exists()
