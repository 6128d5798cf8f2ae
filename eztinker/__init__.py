"""EZTinker's Python client, shaped like the Tinker SDK.

A Tinker training loop ports by changing the import and the base URL::

    import eztinker as tinker
    from eztinker import types

    service = tinker.ServiceClient(base_url="http://localhost:8000")
    tc = service.create_lora_training_client(base_model="tiny-gpt2", rank=16)
    fb = tc.forward_backward(batch, "cross_entropy")
    opt = tc.optim_step(types.AdamParams(learning_rate=1e-4))
    print(fb.result().metrics["loss:sum"], opt.result().metrics)

Nothing here imports torch; the server does the GPU work.
"""

from eztinker import types
from eztinker.errors import (
    APIConnectionError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    EZTinkerAPIError,
    EZTinkerError,
    InternalServerError,
    NotFoundError,
    OperationTimeoutError,
    PayloadTooLargeError,
    RateLimitError,
    RequestFailedError,
    ServiceUnavailableError,
)
from eztinker.futures import APIFuture, FutureProgress, Submission
from eztinker.history import MetricPoint
from eztinker.sampling_client import SamplingClient
from eztinker.service_client import ServiceClient
from eztinker.tokenizer import Tokenizer
from eztinker.training_client import TrainingClient
from eztinker.transport import RetryPolicy
from eztinker.types import (
    AdamParams,
    Checkpoint,
    Datum,
    EncodedTextChunk,
    ForwardBackwardOutput,
    LoadWeightsResponse,
    ModelInput,
    OptimStepResponse,
    RunInfo,
    SampledSequence,
    SampleResponse,
    SamplingParams,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
    ServerCapabilities,
    TensorData,
)

__version__ = "0.1.0"

__all__ = [
    "APIConnectionError",
    "APIFuture",
    "AdamParams",
    "AuthenticationError",
    "BadRequestError",
    "Checkpoint",
    "ConflictError",
    "Datum",
    "EZTinkerAPIError",
    "EZTinkerError",
    "EncodedTextChunk",
    "ForwardBackwardOutput",
    "FutureProgress",
    "InternalServerError",
    "LoadWeightsResponse",
    "MetricPoint",
    "ModelInput",
    "NotFoundError",
    "OperationTimeoutError",
    "OptimStepResponse",
    "PayloadTooLargeError",
    "RateLimitError",
    "RequestFailedError",
    "RetryPolicy",
    "RunInfo",
    "SampleResponse",
    "SampledSequence",
    "SamplingClient",
    "SamplingParams",
    "SaveWeightsForSamplerResponse",
    "SaveWeightsResponse",
    "ServerCapabilities",
    "ServiceClient",
    "ServiceUnavailableError",
    "Submission",
    "TensorData",
    "Tokenizer",
    "TrainingClient",
    "types",
]
