"""Thin command-line front ends: options -> frozen config -> one library call."""
