"""The placement planner's parts: the latency profile of a machine (`splitserve profile`) and a
discrete-event simulator of the cluster over a workload (`splitserve simulate`). Nothing here needs
torch except the profile's measurement, which loads the engine in its own processes."""
