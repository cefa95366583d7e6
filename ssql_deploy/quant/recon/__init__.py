"""Rounding reconstruction after calibration: AdaRound (per layer), BRECQ and QDrop (per block), bias correction."""
