"""The edge agent must run on numpy + onnxruntime + paho only: no torch, no ray."""

import subprocess
import sys

EDGE_MODULES = ["edge.agent", "edge.encoder", "edge.sources", "edge.mic", "edge.source_blocks", "edge.resample",
                "edge.spool", "edge.spool_recovery", "edge.link", "edge.publisher", "edge.model_update",
                "edge.procstat", "shared_models.wire", "shared_models.synth", "shared_models.bundle",
                "soundfleet.cli", "soundfleet.config", "soundfleet.services"]


def test_edge_modules_load_without_torch_or_ray_or_pydantic():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in EDGE_MODULES)
        + "import soundfleet.cli as cli; cli.build_parser()\n"
        + "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchaudio', 'ray', 'pydantic'))\n"
        + "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"edge import pulled in: {out.stdout.strip()}"


def test_edge_encoder_runs_shipped_model_without_torch():
    code = (
        "import sys, numpy as np\n"
        "from edge.encoder import EdgeEncoder\n"
        "enc = EdgeEncoder()\n"
        "out = enc.encode(np.zeros((40, 400), np.float32))\n"
        "assert out.codes.shape == (40,) and out.codes.dtype == np.uint16\n"
        "assert 'torch' not in sys.modules and 'ray' not in sys.modules\n"
        "print(enc.model_version)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("sf1-")
