from .rnn import LSTM, GRU, RNN
from .cells import LSTMCell, GRUCell, RNNCell

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"]
