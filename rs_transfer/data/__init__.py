"""Readers every task shares: text files as real datasets ship them, images of any PIL mode as 8-bit RGB, and
which folders of a class-folder split are classes."""
