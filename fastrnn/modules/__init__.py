from .rnn import LSTM, GRU, RNN
from .cells import LSTMCell, GRUCell, RNNCell
from .attention import MultiheadAttention, AdditiveAttention, LuongAttention

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "MultiheadAttention", "AdditiveAttention", "LuongAttention"]
