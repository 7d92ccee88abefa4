"""Latency/throughput: the timed step is the run's own inference engine; warm-up and repeats as configured."""

from __future__ import annotations

import pytest
import torch

from tiled_hydra.build import build_data, build_run
from tiled_hydra.inference.latency import measure_speed, timed_seconds


@pytest.mark.parametrize("setup", ["st9", "ens4"])  # one shared model on overlapping tiles; one model per tile
def test_timed_step_equals_the_runs_inference(trained_run, setup):
    cached = trained_run("padim", setup)
    run = build_run(cached.cfg, cached.run_dir / "checkpoints")
    data = build_data(cached.cfg, run.grid)
    (maps, scores), = run.engine(keep=False).predict(data.test.images)  # as the run's evaluation: slots read from disk
    step = run.engine(keep=True)
    step_maps, step_scores = step(data.test.images)
    torch.testing.assert_close(step_maps, maps, atol=1e-6, rtol=0)
    torch.testing.assert_close(step_scores, scores, atol=1e-6, rtol=0)

    calls = []
    speed = measure_speed(lambda batch: calls.append(len(batch)) or step(batch), data.test.images, warmup=1, repeats=3,
                          throughput_batch_size=3)
    # latency: 1 warm-up + 3 timed steps of 1 image; throughput: ceil(1/3) + ceil(3/3) steps of 3
    assert calls == [1, 1, 1, 1, 3, 3]
    assert set(speed) == {"latency_ms", "throughput_images_per_second", "throughput_batch_size"}
    assert speed["latency_ms"] > 0 and speed["throughput_images_per_second"] > 0 and speed["throughput_batch_size"] == 3


def test_warmup_is_untimed_and_batches_cycle_through_the_images():
    images = torch.arange(5).view(5, 1, 1, 1)
    seen = []
    seconds = timed_seconds(lambda batch: seen.append(batch.flatten().tolist()), images, batch_size=3, warmup_steps=2, timed_steps=3)
    assert len(seconds) == 3  # only the timed steps are returned
    assert seen == [[0, 1, 2], [3, 4, 0], [1, 2, 3], [4, 0, 1], [2, 3, 4]]


def test_bad_speed_settings_are_refused():
    with pytest.raises(ValueError, match="repeats"):
        measure_speed(None, torch.zeros(1, 3, 8, 8, dtype=torch.uint8), warmup=0, repeats=0, throughput_batch_size=1)
