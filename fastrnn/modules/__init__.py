from .rnn import LSTM, GRU, RNN
from .cells import LSTMCell, GRUCell, RNNCell
from .attention import MultiheadAttention, AdditiveAttention, LuongAttention
from .variants import (LayerNormLSTM, LayerNormGRU, PeepholeLSTM, LayerNormLSTMCell, LayerNormGRUCell,
                       PeepholeLSTMCell)

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "MultiheadAttention", "AdditiveAttention", "LuongAttention",
           "LayerNormLSTM", "LayerNormGRU", "PeepholeLSTM", "LayerNormLSTMCell", "LayerNormGRUCell", "PeepholeLSTMCell"]
