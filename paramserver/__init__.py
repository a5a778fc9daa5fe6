"""paramserver: the home of the K x d class matrix (numpy + pyzmq, never torch)."""
