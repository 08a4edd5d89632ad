"""peer_model: a growable PEER (Mixture of A Million Experts) language model in pure PyTorch.

Modules: config, pool, retrieval, experts, peer, model, optim, train, generate, checkpoint, usage,
tokenizer, corpora, runtime, cli. The library never imports the service.
"""
