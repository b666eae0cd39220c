"""Host tuning for ssi-pager: check, plan, apply and revert sysctl and device settings."""
