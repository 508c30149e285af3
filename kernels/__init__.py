"""calibray shared kernels: one folder per op, each a PyTorch reference + a Triton kernel.

Every public function dispatches once per call: CUDA tensors -> Triton, CPU -> reference;
`CALIBRAY_FORCE_TRITON=1` forces Triton (tests run it under `TRITON_INTERPRET=1`).
"""

from kernels.attention_received import attention_received
from kernels.indexer_logits import indexer_logits
from kernels.sparse_attention import sparse_attention
from kernels.topk import topk_indices

__all__ = ["attention_received", "indexer_logits", "sparse_attention", "topk_indices"]
