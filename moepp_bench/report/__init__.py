"""The report layer: the only code that writes result files, prints tables or draws plots."""
