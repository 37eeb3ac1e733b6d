"""Readers every task shares: text files as real datasets ship them, and images of any PIL mode as 8-bit RGB."""
