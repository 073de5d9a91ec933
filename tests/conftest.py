"""Suite-wide: run the modules with slow tests first.

`make test` runs the suite on pytest-xdist workers, whole modules per worker (`--dist loadscope`),
handed out in collection order. A long module collected last keeps one worker busy while the
others idle; started first, the short modules fill in around it. Within a module the order
stays as written (module fixtures are built once per worker either way)."""


def pytest_collection_modifyitems(config, items):
    def module_of(item):
        return item.nodeid.split("::", 1)[0]

    slow_modules = {module_of(item) for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: module_of(item) not in slow_modules)  # stable: keeps the order inside
