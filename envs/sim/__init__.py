"""The simulated datacenter: topology, power, thermal, serving, workload and faults."""
