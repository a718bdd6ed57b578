# via-tunnel: install and uninstall where the FHS, systemd and each shell look.
#
#   make install   [PREFIX=/usr/local] [DESTDIR=] [VENV=/opt/via-tunnel]
#   make uninstall [PREFIX=/usr/local] [DESTDIR=] [VENV=/opt/via-tunnel]
#   make completions          regenerate completions/ from the CLI definition
#
# The program lives in a venv (VENV) made from Debian's python3 with
# --system-site-packages, so that the nftables binding of python3-nftables is visible;
# $(BINDIR)/via-tunnel is a symlink to it. Needs: python3-venv python3-nftables nftables
# iproute2 python3-dbus (scripts/lib.sh RUNTIME_DEBS). With DESTDIR the tree is staged for packaging:
# the venv's scripts name $(VENV), not the staging directory.

PREFIX ?= /usr/local
DESTDIR ?=
VENV ?= /opt/via-tunnel
PYTHON ?= /usr/bin/python3
PIP_FLAGS ?= -q --disable-pip-version-check
GEN_PYTHON ?= .venv/bin/python

BINDIR = $(PREFIX)/bin
BASHDIR = $(PREFIX)/share/bash-completion/completions
# zsh on Debian reads vendor-completions of /usr only; below /usr/local, site-functions.
ifeq ($(PREFIX),/usr)
ZSHDIR ?= $(PREFIX)/share/zsh/vendor-completions
else
ZSHDIR ?= $(PREFIX)/share/zsh/site-functions
endif
# fish reads vendor_completions.d of each XDG_DATA_DIRS entry (only /usr/share when unset).
FISHDIR ?= $(PREFIX)/share/fish/vendor_completions.d
MAN1DIR = $(PREFIX)/share/man/man1
UNITDIR = $(PREFIX)/lib/systemd/system
UNITS = via-tunnel.service via-tunnel.socket via-tunnel.slice via-tunnel-gateway@.service

.PHONY: all install install-program install-data uninstall completions check-completions

all:
	@echo "make install | make uninstall | make completions (PREFIX=$(PREFIX) VENV=$(VENV))"

install: install-program install-data

install-program:
	test -x $(DESTDIR)$(VENV)/bin/python || \
		$(PYTHON) -m venv --system-site-packages $(DESTDIR)$(VENV)
	$(DESTDIR)$(VENV)/bin/python -m pip install $(PIP_FLAGS) .
	@# scripts pip wrote name the staging directory: point them at the final place
	@if [ -n "$(DESTDIR)" ]; then \
		grep -lrF -- "$(DESTDIR)$(VENV)" $(DESTDIR)$(VENV)/bin | \
			xargs -r sed -i "s|$(DESTDIR)$(VENV)|$(VENV)|g"; \
	fi
	install -d $(DESTDIR)$(BINDIR)
	ln -sfn $(VENV)/bin/via-tunnel $(DESTDIR)$(BINDIR)/via-tunnel

install-data:
	install -D -m 644 completions/via-tunnel.bash $(DESTDIR)$(BASHDIR)/via-tunnel
	install -D -m 644 completions/_via-tunnel $(DESTDIR)$(ZSHDIR)/_via-tunnel
	install -D -m 644 completions/via-tunnel.fish $(DESTDIR)$(FISHDIR)/via-tunnel.fish
	install -D -m 644 man/via-tunnel.1 $(DESTDIR)$(MAN1DIR)/via-tunnel.1
	install -d $(DESTDIR)$(UNITDIR)
	@# the daemon's unit names the program by its installed path
	for u in $(UNITS); do \
		sed "s|/usr/local/bin/via-tunnel|$(BINDIR)/via-tunnel|g" systemd/$$u \
			> $(DESTDIR)$(UNITDIR)/$$u && chmod 644 $(DESTDIR)$(UNITDIR)/$$u || exit 1; \
	done

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/via-tunnel
	rm -f $(DESTDIR)$(BASHDIR)/via-tunnel $(DESTDIR)$(ZSHDIR)/_via-tunnel \
		$(DESTDIR)$(FISHDIR)/via-tunnel.fish $(DESTDIR)$(MAN1DIR)/via-tunnel.1
	rm -f $(addprefix $(DESTDIR)$(UNITDIR)/,$(UNITS))
	@# only a venv that holds via-tunnel is removed, never whatever VENV names
	if [ -f $(DESTDIR)$(VENV)/pyvenv.cfg ] && [ -x $(DESTDIR)$(VENV)/bin/via-tunnel ]; then \
		rm -rf $(DESTDIR)$(VENV); \
	fi

completions:
	$(GEN_PYTHON) -m via_tunnel.cli.completion_gen

check-completions:
	$(GEN_PYTHON) -m via_tunnel.cli.completion_gen --check
