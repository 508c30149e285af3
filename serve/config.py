"""Typed arguments of the serving application (what `serve run serve.app:build key=val` takes).

Ray Serve validates the builder's arguments against this pydantic model, so a bad value fails
with the field's name before any replica starts. The same fields appear under `args:` in
configs/serve.yaml for `serve deploy`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ServeArgs(BaseModel):
    """Model address, optional calibrated configs, replica and batching settings."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="runs:/<run_id>/model, a checkpoint directory, or hf:<path>")
    name: str | None = Field(None, description="served model id (default: derived from the address)")
    # Calibrated configs: an MLflow run id (32 hex), runs:/<id>/<file>.json, or a JSON path.
    indexcache: str | None = Field(None, description="IndexCache config (indexcache.json) or run id")
    pattern: str | None = Field(None, description="explicit F/S pattern; overrides indexcache")
    retention: float | None = Field(None, gt=0, le=1, description="which IndexCache pattern to use")
    kv_precision: str | None = Field(None, description="KVTuner config (kv_precision.json) or run id")
    kv_budget: float | None = Field(None, gt=0, description="which KVTuner map (equivalent bits)")
    kv_prefill: Literal["full", "quantized"] = Field(
        "full", description="what a prefill attends to: its own K/V at full precision (KIVI), or as stored"
    )
    prefixkv: str | None = Field(None, description="PrefixKV config (prefixkv.json) or run id")
    keep_ratio: float | None = Field(None, gt=0, le=1, description="PrefixKV budget ratio to apply")
    # Replicas.
    num_replicas: int | None = Field(1, ge=1, description="fixed replica count (or use autoscaling)")
    autoscaling_config: dict[str, Any] | None = Field(None, description="Serve autoscaling config")
    max_ongoing_requests: int = Field(64, ge=1, description="requests a replica holds at once")
    replica_cpus: float = Field(1.0, ge=0, description="CPUs reserved per model replica")
    replica_gpus: float = Field(0.0, ge=0, description="GPUs reserved per model replica")
    ingress_cpus: float = Field(0.1, ge=0, description="CPUs reserved per ingress replica")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads per replica")
    health_check_period_s: float = Field(5.0, gt=0, description="Serve health-check period")
    # Batching and limits.
    max_batch_size: int = Field(16, ge=1, description="requests decoded together (1 = unbatched)")
    batch_wait_s: float = Field(0.002, ge=0, description="wait for companions when idle")
    max_tokens_limit: int = Field(256, ge=1, le=4096, description="largest max_tokens accepted")
    max_context: int | None = Field(None, ge=2, description="prompt+completion tokens (default: model's)")
    max_prefill_tokens: int = Field(4096, ge=1, description="tokens (padding included) in one prefill forward")
    kv_cache_bytes: int | None = Field(
        None, ge=1, description="KV-cache bytes per replica; requests wait until their cache fits (default: no bound)"
    )

    @model_validator(mode="after")
    def _check(self) -> ServeArgs:
        if self.autoscaling_config is not None and self.num_replicas not in (None, 1):
            raise ValueError(f"num_replicas={self.num_replicas!r} and autoscaling_config are exclusive; set one")
        if self.prefixkv is not None and self.keep_ratio is None:
            raise ValueError("keep_ratio is required with prefixkv (which budget ratio to serve)")
        if self.keep_ratio is not None and self.prefixkv is None:
            raise ValueError(f"keep_ratio={self.keep_ratio!r} needs prefixkv (a config or run id)")
        return self

    def served_name(self) -> str:
        if self.name:
            return self.name
        m = self.model.rstrip("/")
        if m.startswith("runs:/"):
            return "calibray-" + m.split("/")[1][:8]
        return "calibray-" + m.split("/")[-1].removeprefix("hf:")
