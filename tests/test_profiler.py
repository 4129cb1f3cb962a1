"""`edgemoe profile`: the device profiler writes a profile the loader accepts; the shipped profiles
load; the model profiler writes report.md (and plots) with sane numbers; the fast cache simulator
gives exactly edgemoe.devices.replay's figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from edgemoe.cli import main
from edgemoe.devices import cachesim, kernel_speed, measure, model_profile, perf_model, profiles, replay
from edgemoe.testing import synth

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "profiles").glob("*.yaml"))


def test_device_profile_is_accepted_by_the_loader(tmp_path, capsys):
    out = tmp_path / "prof" / "tiny-box.yaml"
    storage = tmp_path / "disk"
    storage.mkdir()
    rc = main(
        [
            "profile",
            "--storage",
            str(storage),
            "--out",
            str(out),
            "--name",
            "tiny-box",
            "--size",
            "8MiB",
            "--mem-size",
            "16MiB",
            "--time-limit",
            "0.5",
            "--no-kernels",
        ]
    )
    assert rc == 0
    p = profiles.load_profile(out)  # the loader `edgemoe bench --profile` uses
    assert p.name == "tiny-box"
    assert p.storage.seq_read_mbps > 0 and p.storage.rand_read_mbps > 0 and p.storage.read_latency_us > 0
    assert p.memory_bandwidth_gbps > 0 and p.cores >= 1
    assert 0 < p.default_budget < p.ram
    assert p.storage.kind in profiles.STORAGE_KINDS
    raw = yaml.safe_load(out.read_text())
    assert raw["measured"]["storage_method"]
    assert not list(storage.iterdir())  # the test file is gone
    assert not [f for f in out.parent.iterdir() if f.name != out.name]  # no temp file left behind
    text = capsys.readouterr().out
    assert "sequential read" in text and "memory bandwidth" in text
    for line in out.read_text().splitlines():  # every figure says where it comes from
        top_level_figure = line.strip() and not line.startswith(("#", "measured:", "  ")) and ":" in line
        if top_level_figure and not line.endswith(":") and line.split(":")[0] not in ("name", "description"):
            assert "#" in line, line


def test_kernel_measurements_record_every_type():
    k = kernel_speed.measure_kernels(n_out=64, n_in=256, budget_s=0.01, nested_bits=(2, 4))
    assert set(k["gguf"]) == {"Q4_0", "Q8_0", "Q4_K"}
    for r in k["gguf"].values():
        assert r.get("gbps", 0) > 0 or "error" in r
    nested = k["nested"]  # edgemoe.quant.nested may be unfinished: an error is recorded, nothing raised
    assert "error" in nested or all("widths" in r or "error" in r for r in nested.values())
    for r in nested.values():
        for w in r.get("widths", {}).values() if isinstance(r, dict) else ():
            assert w["gbps"] > 0


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    assert main(["profile", "--storage", str(tmp_path / "nope"), "--out", str(tmp_path / "x.yaml")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["profile", "-m", "x.gguf"]) == 2
    assert "--text" in capsys.readouterr().err


QUICK_PROFILE = ["--size", "8MiB", "--mem-size", "16MiB", "--time-limit", "0.3", "--no-kernels"]


@pytest.fixture
def user_home(tmp_path, monkeypatch):
    """A fresh user config dir ($XDG_CONFIG_HOME) and an empty current directory."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("EDGEMOE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path


def test_a_measured_profile_is_found_by_name(user_home, capsys):
    """`edgemoe profile` writes into the user's config dir and says so; `--profile NAME` then finds it
    (the loader every --profile goes through, and run's budget from it)."""
    from argparse import Namespace

    from edgemoe.options import budget_of

    (user_home / "disk").mkdir()
    assert main(["profile", "--name", "my-box", "--storage", str(user_home / "disk"), *QUICK_PROFILE]) == 0
    written = user_home / "config" / "edgemoe" / "profiles" / "my-box.yaml"
    assert written.is_file() and not list(Path.cwd().iterdir())
    out = capsys.readouterr().out
    assert str(written) in out and "--profile my-box" in out
    p = profiles.load_profile("my-box")
    assert p.name == "my-box"
    assert budget_of(Namespace(budget=None, profile="my-box")) == p.default_budget
    assert "my-box" in profiles.available()
    with pytest.raises(SystemExit):  # the help says where it writes
        main(["profile", "--help"])
    assert str(user_home / "config" / "edgemoe" / "profiles") in "".join(capsys.readouterr().out.split())
    # ./profiles/NAME.yaml comes before the user's, ./NAME.yaml before both
    shipped = profiles.profiles_dir() / "emmc-sbc-4gb.yaml"
    (Path.cwd() / "profiles").mkdir()
    (Path.cwd() / "profiles" / "my-box.yaml").write_text(shipped.read_text())
    assert profiles.find_profile("my-box").resolve() == (Path.cwd() / "profiles" / "my-box.yaml").resolve()
    assert profiles.load_profile("my-box").name == "emmc-sbc-4gb"
    (Path.cwd() / "my-box.yaml").write_text(shipped.read_text())
    assert profiles.find_profile("my-box").resolve() == (Path.cwd() / "my-box.yaml").resolve()
    assert profiles.load_profile("emmc-sbc-4gb").name == "emmc-sbc-4gb"  # shipped ones still by name


def test_profile_errors_say_what_is_wrong(user_home):
    """A file that is not a profile is "not a valid profile (why)", an unknown name lists where it
    looked and the names there: one line from the CLI, exit 2."""
    import subprocess
    import sys

    def run_profile(value: str) -> str:
        p = subprocess.run(
            [sys.executable, "-m", "edgemoe", "run", "--profile", value, "-n", "1", "hi"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert p.stderr.startswith("edgemoe: error: ")
        return p.stderr.strip()

    err = run_profile("/etc/passwd")
    assert "/etc/passwd: not a valid profile (" in err and "no such" not in err
    user = user_home / "config" / "edgemoe" / "profiles"
    user.mkdir(parents=True)
    (user / "half.yaml").write_text("name: half\nram: 4GiB\n")
    err = run_profile("half")
    assert f"{user / 'half.yaml'}: not a valid profile (storage.kind is missing)" in err
    (user / "broken.yaml").write_text("name: [unclosed\n")
    assert "broken.yaml: not a valid profile (not YAML" in run_profile("broken")
    err = run_profile("no-such-box")
    assert "no-such-box: no such profile" in err
    # the shipped profiles of the edgemoe the CLI imports (an installed one, outside a checkout)
    shipped = subprocess.run(
        [sys.executable, "-c", "from edgemoe.devices.profiles import profiles_dir; print(profiles_dir())"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    for where in ("./no-such-box.yaml", str(user / "no-such-box.yaml"), shipped):
        assert where in err, where
    assert "known: " in err and "emmc-sbc-4gb" in err and "half" in err
    assert run_profile(str(user_home / "missing.yaml")).endswith("missing.yaml: no such profile file")


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_profiles_load(path):
    p = profiles.load_profile(path)
    assert p.name == path.stem
    assert p.default_budget <= 0.75 * p.ram  # room for the OS
    for line in path.read_text().splitlines():  # every figure carries a comment
        key = line.split(":")[0].strip()
        if key in (
            "ram",
            "default_budget",
            "cores",
            "memory_bandwidth_gbps",
            "seq_read_mbps",
            "rand_read_mbps",
            "read_latency_us",
            "readahead_kb",
        ):
            assert "#" in line, line


def test_the_five_devices_are_shipped():
    names = {p.stem for p in SHIPPED}
    assert {
        "raspberry-pi-5-8gb-microsd",
        "raspberry-pi-5-8gb-nvme",
        "jetson-orin-nano-8gb",
        "ufs31-phone-board",
        "laptop-16gb-nvme",
    } <= names


def test_fast_simulator_matches_replay():
    rng = np.random.default_rng(3)
    trace = rng.integers(0, 10, size=(50, 3, 3))
    trace[:, 0, :] = -1  # a dense layer
    reqs = cachesim.trace_requests(trace)
    rr = replay.requests(trace)
    assert list(zip(reqs[1].tolist(), reqs[2].tolist())) == [(r[0], r[1]) for r in rr]
    for slots in (3, 4, 7, 12, 20):
        for p in ("lru", "lfu", "score"):
            assert cachesim.simulate(reqs, 3, 10, slots, p, 50).sum() == replay.replay_policy(rr, 3, 1, slots, p)
        assert cachesim.simulate(reqs, 3, 10, slots, "belady", 50).sum() == replay.replay_belady(rr, slots)


def test_reuse_and_popularity_definitions():
    # one layer, top-2: token t picks {t%4, (t+1)%4}
    trace = np.array([[[t % 4, (t + 1) % 4]] for t in range(40)])
    r = cachesim.reuse(trace, 4, windows=(1, 2, 3))
    assert r[1]["measured"] == pytest.approx(0.5)  # t was used by the previous token, t+1 was not
    assert r[2]["measured"] == pytest.approx(0.5)  # nor by the one before
    assert r[3]["measured"] == pytest.approx(1.0)  # t+1 = t-3 (mod 4)
    assert r[1]["uniform"] == pytest.approx(0.5)
    pop = cachesim.popularity(trace, 8)
    assert pop["top_eighth_share"][0] == pytest.approx(0.25)
    assert pop["entropy_bits"][0] == pytest.approx(2.0)


def test_prediction_formula():
    p = profiles.parse_profile(
        dict(
            name="d",
            description="d",
            ram="8GiB",
            default_budget="4GiB",
            cores=4,
            memory_bandwidth_gbps=10.0,
            storage=dict(kind="nvme", seq_read_mbps=1000, rand_read_mbps=500, read_latency_us=100, readahead_kb=128),
        )
    )
    # 2 misses per token, 8 experts of 1 MB used, 2 MB of dense weights read: the reads at the
    # sequential bandwidth (not the random one) plus one latency each; the max of compute and reads
    r = perf_model.predict(p, 2e6 + 8 * 1e6, 2 * 1e6, 2.0)
    assert r["t_compute"] == pytest.approx((2e6 + 8e6) / 10e9)
    assert r["t_io"] == pytest.approx(2 * (1e6 / 1000e6 + 100e-6))
    assert r["tokens_per_s"] == pytest.approx(1 / r["t_io"]) and r["bound"] == "storage"


@pytest.fixture(scope="module")
def model_report(tmp_path_factory):
    d = tmp_path_factory.mktemp("mprof")
    model = synth.write_model(synth.SynthSpec.tiny("qwen3moe", n_expert=16, n_layer=4), d / "tiny.gguf")
    text = d / "text.txt"
    text.write_text(
        getattr(synth, "_SAMPLE_TEXT", "") + "The quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8"
    )
    dev = d / "dev.yaml"
    dev.write_text((ROOT / "profiles" / "raspberry-pi-5-8gb-nvme.yaml").read_text())
    out = d / "out"
    rc = main(
        [
            "profile",
            "-m",
            str(model),
            "--text",
            str(text),
            "--tokens",
            "48",
            "--out-dir",
            str(out),
            "--device",
            str(dev),
        ]
    )
    assert rc == 0
    return out, model_profile.profile_model(model, text, d / "out2", tokens=48, device=dev, plots=False)


def _cache_misses(reqs, n_layer: int, slots: int, policy: str, warm_from: int) -> tuple[int, int]:
    """(all misses, misses from request warm_from on) of the real ExpertCache holding `slots`
    one-plane experts of one byte each, visited as edgemoe.devices.replay.replay_policy visits it."""
    from edgemoe.runtime.cache import ExpertCache

    cache = ExpertCache(replay.PlaneCounter(n_layer, [1]), slots, policy)
    before = 0
    for i, (layer, e, first) in enumerate(reqs):
        if i == warm_from:
            before = cache.state().misses
        if first:
            cache.visit(layer)
        cache.get(layer, e, 1)
    total = cache.state().misses
    return total, total - before


def test_model_profile_report(model_report):
    out, res = model_report
    report = (out / "report.md").read_text()
    for heading in (
        "Expert popularity",
        "Token-to-token reuse",
        "Hit rate against cache size",
        "Prediction for this device",
        "Recommendation",
    ):
        assert heading in report
    assert res["trace_shape"] == [48, 4, 2]
    trace = np.load(out.parent / "out2" / "trace.npy")
    assert trace.shape == (48, 4, 2) and (trace >= 0).all()
    rr = replay.requests(trace)
    half = 24
    warm_from = sum(1 for t in range(half) for l in range(4) for _ in set(trace[t, l].tolist()))
    assert len(rr) == 48 * 4 * 2  # every layer is MoE and a token's top-2 experts are distinct
    for r in res["hit_rows"]:
        assert r["requests"] == len(rr) and r["warm_requests"] == len(rr) - warm_from
        for p in ("lru", "lfu", "score"):
            # the misses of edgemoe.runtime.cache.ExpertCache itself replaying the same requests
            cold, warm = _cache_misses(rr, 4, r["slots"], p, warm_from)
            assert (r[p], r[p + "_warm"]) == (cold, warm), (p, r)
        assert r["belady"] == replay.replay_belady(rr, r["slots"])
        assert r["belady_warm"] == replay.replay_belady(rr, r["slots"], count_from=warm_from)
        assert r["belady"] <= min(r["lru"], r["lfu"], r["score"])  # Belady reads the fewest bytes
    hits = [1 - r["belady"] / r["requests"] for r in res["hit_rows"]]
    assert hits == sorted(hits)  # a bigger cache never hurts the optimum
    for w in res["reuse"].values():
        assert 0 <= w["measured"] <= 1
    rec = res["recommendation"]
    assert rec is not None and rec["fits"] and rec["bits"] in res["facts"].widths
    assert rec["tokens_per_s"] > 0 and rec["budget"] <= res["profile"].default_budget
    assert (out / "trace.npy").is_file()


def test_model_profile_plots(model_report):
    pytest.importorskip("matplotlib")
    out, _ = model_report
    for name in ("hit_rate.png", "popularity.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
        assert f"]({name})" in (out / "report.md").read_text()


def test_model_profile_from_a_saved_trace(model_report, tmp_path):
    out, res = model_report
    model = out.parent / "tiny.gguf"
    again = model_profile.profile_model(
        model, None, tmp_path / "again", device=out.parent / "dev.yaml", plots=False, trace_path=out / "trace.npy"
    )
    assert again["hit_rows"] == res["hit_rows"]
    assert "saved trace" in (tmp_path / "again" / "report.md").read_text()


def test_storage_without_o_direct_drops_the_page_cache(tmp_path, monkeypatch):
    monkeypatch.delattr(measure.os, "O_DIRECT", raising=False)
    st = measure.measure_storage(tmp_path, size=8 * measure.MiB, time_limit=0.2)
    assert st["method"].startswith("posix_fadvise")
    assert st["seq_read_mbps"] > 0 and st["read_latency_us"] > 0
    assert not list(tmp_path.iterdir())
