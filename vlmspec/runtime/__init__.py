"""The PyTorch runtime: a checked spec becomes a working `nn.Module`.

Nothing is imported here, so `import vlmspec.runtime` stays free of torch for the front end; use
`vlmspec.runtime.model.build_model`, `vlmspec.runtime.train.freeze.apply_stage` and
`vlmspec.runtime.language.moe.upcycle` directly.
"""
