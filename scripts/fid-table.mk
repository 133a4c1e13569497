# The FID table of the embedded model: baselines and optimized schedules, evaluated side by side.
#
#   make -f scripts/fid-table.mk [STEPOPT=.venv/bin/stepopt] [PYTHON=.venv/bin/python] [OUT=out/fid-table] [N=1000]
#
# For builtin:gmm-digits and NFE 5, 6, 8, 10 it writes
#   $(OUT)/schedules/<solver>/nfe<N>/<method>.yaml   baselines (edm, logsnr, time-uniform, time-quadratic,
#                                                    kl-optimal) and optimized schedules for dpmpp-3m
#                                                    (trust-region, ld3, ays, gits, oss) and euler (ays, gits,
#                                                    oss, with the baselines for comparison); PFDiff
#                                                    (pfdiff-euler, pfdiff-dpmpp-2m) and plain dpmpp-2m on
#                                                    the PFDIFF_BASELINES grids and gits; an optimizer is used
#                                                    only when registered (`stepopt optimize --optimizer NAME`)
#   $(OUT)/table.md, $(OUT)/table.json              `stepopt eval` of all of them: ode-error (exact ODE),
#                                                    fid-digits (torch-fidelity, digits classifier, real
#                                                    digits), fd-exact (Fréchet distance to the mixture)
#   $(OUT)/plot.png                                  the NFE-$(PLOT_NFE) dpmpp-3m schedules and each metric vs NFE
# Every sample i uses seed SEED + i, so all rows share their noise. Teacher outputs are cached
# ($STEPOPT_CACHE_DIR or the user cache directory). `make -j2` optimizes in parallel; each command
# runs on one thread (OMP_NUM_THREADS=1 unless set), which is fastest for these small models.

STEPOPT ?= stepopt
PYTHON ?= python
MODEL ?= builtin:gmm-digits
OUT ?= out/fid-table
NFES ?= 5 6 8 10
BASELINES ?= edm logsnr time-uniform time-quadratic kl-optimal
N ?= 1000
SEED ?= 0
METRICS ?= ode-error,fid-digits,fd-exact
PLOT_NFE ?= 6
DEVICE ?= cpu
export OMP_NUM_THREADS ?= 1

REGISTERED := $(shell $(PYTHON) -c 'from stepopt.optimizers import optimizer_names; print(" ".join(optimizer_names()))')
DPM_OPT := $(filter trust-region ld3 ays gits oss,$(REGISTERED))
EULER_OPT := $(filter ays gits oss,$(REGISTERED))
# Timestep skipping at equal NFE: PFDiff on its two base solvers, and plain dpmpp-2m (euler is above).
PFDIFF_SOLVERS ?= dpmpp-2m pfdiff-euler pfdiff-dpmpp-2m
PFDIFF_BASELINES ?= logsnr time-quadratic
PFDIFF_OPT := $(filter gits,$(REGISTERED))

comma := ,
S := $(OUT)/schedules
DPM := $(foreach n,$(NFES),$(foreach m,$(BASELINES) $(DPM_OPT),$(S)/dpmpp-3m/nfe$(n)/$(m).yaml))
EULER := $(if $(EULER_OPT),$(foreach n,$(NFES),$(foreach m,$(BASELINES) $(EULER_OPT),$(S)/euler/nfe$(n)/$(m).yaml)))
PFD := $(foreach n,$(NFES),$(foreach s,$(PFDIFF_SOLVERS),$(foreach m,$(PFDIFF_BASELINES) $(PFDIFF_OPT),$(S)/$(s)/nfe$(n)/$(m).yaml)))
SCHEDULES := $(DPM) $(EULER) $(PFD)
PLOT_SCHEDULES := $(foreach m,$(BASELINES) $(DPM_OPT),$(S)/dpmpp-3m/nfe$(PLOT_NFE)/$(m).yaml)

.PHONY: all schedules clean
all: $(OUT)/table.md $(OUT)/table.json $(OUT)/plot.png

schedules: $(SCHEDULES)

# <solver>/nfe<N>/<method>: a baseline by `stepopt baseline`, anything else by `stepopt optimize`.
$(S)/%.yaml:
	@set -e; solver=$$(echo '$*' | cut -d/ -f1); nfe=$$(echo '$*' | cut -d/ -f2 | sed 's/^nfe//'); \
	method=$$(echo '$*' | cut -d/ -f3); \
	case ' $(BASELINES) $(PFDIFF_BASELINES) ' in \
	  *" $$method "*) $(STEPOPT) baseline $$method --model $(MODEL) --solver $$solver --nfe $$nfe --out $@ ;; \
	  *) $(STEPOPT) optimize --model $(MODEL) --solver $$solver --nfe $$nfe --optimizer $$method \
	       --seed $(SEED) --device $(DEVICE) --out $@ ;; \
	esac

# One evaluation of every schedule: the markdown table via --out, the JSON rows via --json.
$(OUT)/table.json: $(SCHEDULES)
	$(STEPOPT) eval $(foreach f,$^,-S $(f)) --metrics $(METRICS) --n $(N) --seed $(SEED) --device $(DEVICE) \
	  --out $(OUT)/table.md --json > $@.tmp
	mv $@.tmp $@

$(OUT)/table.md: $(OUT)/table.json
	@test -f $@

$(OUT)/plot.png: $(OUT)/table.json $(PLOT_SCHEDULES)
	$(STEPOPT) plot --eval $< $(foreach f,$(PLOT_SCHEDULES),-S $(f)) \
	  $(foreach m,$(subst $(comma), ,$(METRICS)),--metric $(m)) \
	  --title "$(MODEL): $(N) samples per schedule" --out $@

clean:
	rm -rf $(OUT)
