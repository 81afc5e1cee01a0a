"""The batch side of the engine: a batch reduced to its features (tokens, squared lengths, attention
windows, labelled positions) on its own device, without a host sync, planned once per batch layout."""
