"""The plain forwarders the relay is measured against (bench/bench_vs_plain.py): the shortest
programs that move the docker CLI's event lines to a destination, with nothing of the relay."""
