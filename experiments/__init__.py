"""The studies of the project, one subpackage each, run from the repository root as
`python -m experiments.<study> [--quick] [--out DIR]` (README.md lists them); experiments.harness holds what they
share."""
