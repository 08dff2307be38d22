"""The objects every layer shares: the artifact that flows between stages, the stage and pipeline
contracts, the build context, datasets and input feeds, options, registries and errors.
Imports nothing else of the toolchain."""
