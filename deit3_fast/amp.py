"""The names `train.amp` takes, torch-free: the config schema checks the key against `AMP_CHOICES` at load, and
device.py (which imports torch) maps each precision to its dtype and resolves `auto` for a device."""

from __future__ import annotations

# Each precision and the name of its torch dtype (device.AMP_DTYPES: the dtypes themselves).
PRECISIONS = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
AMP_CHOICES = ("auto", *PRECISIONS)  # auto: bf16 where native, else fp16 + GradScaler
