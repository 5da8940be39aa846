"""The SYMI paper's motivation table on our executor: capacity factor versus token survival and steps to a target
loss."""
