"""The demo federation and the reproduction of the reference study (they drive every real part)."""
