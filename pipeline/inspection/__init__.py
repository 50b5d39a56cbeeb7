"""Looking at caches: verify, describe (inspect, ls), show, and estimate before extracting."""
