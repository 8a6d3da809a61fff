"""The Envoy external-processing (ext_proc) side of Tollgate: servicer, processor, responses."""
