"""Corpora (the shared MASSIVE, xSID and Tatoeba files) and the evaluation harness."""
