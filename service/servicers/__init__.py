"""gRPC servicers: thin adapters from proto requests to the domain and back."""
