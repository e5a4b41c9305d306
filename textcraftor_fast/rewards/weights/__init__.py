"""Shipped reward weights (a package so setuptools installs the .pth and its LICENSE as package data)."""
