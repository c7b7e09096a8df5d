"""Export to TFLite (`litert`) and inspection of TFLite models (`inspect`)."""
