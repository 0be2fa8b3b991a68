"""fastrnn: fused LSTM, GRU, RNN and attention kernels for PyTorch, as drop-in torch.nn layers."""
import torch  # noqa: F401  (loads libtorch before our library)

from . import _C  # noqa: F401  (registers torch.ops.fastrnn.*)
from . import _ops  # noqa: F401  (fake kernels)
from . import _autograd  # noqa: F401  (backward formulas)
from . import functional, reference
from .modules.rnn import LSTM, GRU, RNN
from .modules.cells import LSTMCell, GRUCell, RNNCell
from .modules.attention import MultiheadAttention, AdditiveAttention, LuongAttention
from .modules.variants import (LayerNormLSTM, LayerNormGRU, PeepholeLSTM, LayerNormLSTMCell, LayerNormGRUCell,
                               PeepholeLSTMCell)
from .convert import convert, to_torch
from . import models

__version__ = "0.1.0"


def build_info():
    """Facts about the native build: CPU ISA, threads, which GEMM paths exist, CUDA."""
    info = dict(_C.build_info())
    info["num_threads"] = torch.get_num_threads()
    info["torch"] = torch.__version__
    info["gemm_backend"] = _C.get_gemm_backend()
    info["pointwise_isa"] = _C.get_isa()
    info["kernel_vector_bytes"] = _C.kernel_vector_bytes()  # 64 AVX-512, 32 AVX2, 16 baseline build
    return info


__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "LayerNormLSTM", "LayerNormGRU", "PeepholeLSTM",
           "LayerNormLSTMCell", "LayerNormGRUCell", "PeepholeLSTMCell", "MultiheadAttention", "AdditiveAttention",
           "LuongAttention", "convert", "to_torch", "functional", "reference", "build_info", "models"]
