"""The one training loop every task shares (see task.py for the contract)."""
