"""The values a training loop sends and receives, named as in the Tinker SDK.

``from eztinker import types`` gives the same names as ``from tinker import types``:
``Datum``, ``ModelInput``, ``TensorData``, ``AdamParams``, ``SamplingParams``, ``SampleResponse``
and the rest. Each has ``to_json`` (what goes over HTTP) or ``from_json`` (what comes back).
Wherever a tensor is expected, a ``TensorData``, a numpy array, a torch tensor (duck-typed: torch
is never imported here) or a plain list is accepted.
"""

from __future__ import annotations

from eztinker.types.inputs import (
    AdamParams,
    CheckpointKind,
    Datum,
    EncodedTextChunk,
    LossFnType,
    ModelInput,
    SamplingParams,
    StopReason,
    TensorData,
    TensorLike,
)
from eztinker.types.outputs import (
    Checkpoint,
    ForwardBackwardOutput,
    GetInfoResponse,
    GetServerCapabilitiesResponse,
    LoadWeightsResponse,
    LoraConfig,
    LossFnOutput,
    ModelInfo,
    OptimStepResponse,
    RunInfo,
    SampledSequence,
    SampleResponse,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
    ServerCapabilities,
    SupportedModel,
)

__all__ = [
    "AdamParams",
    "Checkpoint",
    "CheckpointKind",
    "Datum",
    "EncodedTextChunk",
    "ForwardBackwardOutput",
    "GetInfoResponse",
    "GetServerCapabilitiesResponse",
    "LoadWeightsResponse",
    "LoraConfig",
    "LossFnOutput",
    "LossFnType",
    "ModelInfo",
    "ModelInput",
    "OptimStepResponse",
    "RunInfo",
    "SampleResponse",
    "SampledSequence",
    "SamplingParams",
    "SaveWeightsForSamplerResponse",
    "SaveWeightsResponse",
    "ServerCapabilities",
    "StopReason",
    "SupportedModel",
    "TensorData",
    "TensorLike",
]
