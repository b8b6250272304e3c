"""The load benchmark in small: 128 concurrent clients against `flowgrpo serve-reward shapes`, no retries."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reward_service_load.py"


def test_128_concurrent_clients_get_correct_rewards_and_no_failures(tmp_path):
    out = tmp_path / "load.json"
    subprocess.run([sys.executable, str(SCRIPT), "--clients", "128", "--requests", "1", "--images", "2",
                    "--out", str(out)], check=True, capture_output=True, text=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["requests"] == 128 and result["clients"] == 128
    assert result["failed"] == 0 and result["failure_reasons"] == {}
    assert result["wrong_rewards"] == 0  # every answer equals the in-process reward of its images
    assert 0.2 < result["mean_reward"] < 0.95  # half the images are scored against another prompt's metadata
    assert result["service_images_per_s"] > 0 and result["in_process_images_per_s"]["before"] > 0
