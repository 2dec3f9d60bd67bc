"""Taylor mode (jets)."""
from torch_hod.taylor.registry import register_taylor_rule, taylor_rule_for
