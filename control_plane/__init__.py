"""The control plane: authentication, billing (holds, settlement, the credits ledger),
chat init (mints stream tokens) and the admin API. Build it with `create_app`."""
