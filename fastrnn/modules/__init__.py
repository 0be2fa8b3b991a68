from .rnn import LSTM, GRU, RNN
from .cells import LSTMCell, GRUCell, RNNCell
from .variants import (LayerNormLSTM, LayerNormGRU, PeepholeLSTM, LayerNormLSTMCell, LayerNormGRUCell,
                       PeepholeLSTMCell)

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "LayerNormLSTM", "LayerNormGRU", "PeepholeLSTM",
           "LayerNormLSTMCell", "LayerNormGRUCell", "PeepholeLSTMCell"]
