#!/bin/bash
# KDAD TIPC driver: train -> eval -> export -> Paddle Inference, driven by a 51-line params file.
#
#   bash test_tipc/test_train_inference_python.sh test_tipc/configs/KDAD/train_infer_python.txt MODE [GPU_ID]
#
# MODE: lite_train_lite_infer | lite_train_whole_infer | whole_infer | whole_train_whole_infer.
# Writes test_tipc/output/<model_name>/<MODE>/results_python.log (one status line per step) and
# exits 1 when any step failed. See test_tipc/docs/test_train_inference_python.md.
# Run from the repository root.

source test_tipc/common_func.sh

FILENAME=$1
MODE=$2
if [ -z "${FILENAME}" ] || [ -z "${MODE}" ]; then
    echo "usage: bash test_tipc/test_train_inference_python.sh PARAMS_FILE MODE [GPU_ID]" >&2
    exit 2
fi
if [ ! -f "${FILENAME}" ]; then
    echo "error: params file '${FILENAME}' does not exist (run from the repository root)" >&2
    exit 2
fi
case ${MODE} in
    lite_train_lite_infer|lite_train_whole_infer|whole_infer|whole_train_whole_infer) ;;
    *) echo "error: unknown MODE '${MODE}'" >&2; exit 2 ;;
esac

func_read_params "${FILENAME}" 51

# ------------------------------------------------------------------------------- train params
model_name=$(func_parser_value "${lines[1]}")
python=$(func_parser_value "${lines[2]}")
gpu_list=$(func_parser_value "${lines[3]}")
train_use_gpu_key=$(func_parser_key "${lines[4]}")
train_use_gpu_value=$(func_parser_value "${lines[4]}")
autocast_list=$(func_parser_value "${lines[5]}")
autocast_key=$(func_parser_key "${lines[5]}")
epoch_key=$(func_parser_key "${lines[6]}")
epoch_num=$(func_parser_params "${lines[6]}" "${MODE}")
save_model_key=$(func_parser_key "${lines[7]}")
train_batch_key=$(func_parser_key "${lines[8]}")
train_batch_value=$(func_parser_params "${lines[8]}" "${MODE}")
pretrain_model_key=$(func_parser_key "${lines[9]}")
pretrain_model_value=$(func_parser_value_mode "${lines[9]}" "${MODE}")
train_model_name=$(func_parser_value_mode "${lines[10]}" "${MODE}")
train_infer_img_dir=$(func_parser_value_mode "${lines[11]}" "${MODE}")
train_param_key1=$(func_parser_key "${lines[12]}")
train_param_value1=$(func_parser_value_mode "${lines[12]}" "${MODE}")

trainer_list=$(func_parser_value "${lines[14]}")
trainer_norm=$(func_parser_key "${lines[15]}")  # upstream name; norm_train is the fallback trainer
norm_trainer=$(func_parser_value_mode "${lines[15]}" "${MODE}")
pact_key=$(func_parser_key "${lines[16]}")
pact_trainer=$(func_parser_value_mode "${lines[16]}" "${MODE}")
fpgm_key=$(func_parser_key "${lines[17]}")
fpgm_trainer=$(func_parser_value_mode "${lines[17]}" "${MODE}")
distill_key=$(func_parser_key "${lines[18]}")
distill_trainer=$(func_parser_value_mode "${lines[18]}" "${MODE}")
trainer_key1=$(func_parser_key "${lines[19]}")
trainer_value1=$(func_parser_value_mode "${lines[19]}" "${MODE}")
trainer_key2=$(func_parser_key "${lines[20]}")
trainer_value2=$(func_parser_value_mode "${lines[20]}" "${MODE}")

# ------------------------------------------------------------------------------- eval params
eval_py=$(func_parser_value_mode "${lines[23]}" "${MODE}")
eval_key1=$(func_parser_key "${lines[24]}")
eval_value1=$(func_parser_value_mode "${lines[24]}" "${MODE}")

# ------------------------------------------------------------------------------- export params
save_infer_key=$(func_parser_key "${lines[27]}")
export_weight_key=$(func_parser_key "${lines[28]}")
norm_export=$(func_parser_value_mode "${lines[29]}" "${MODE}")
pact_export=$(func_parser_value_mode "${lines[30]}" "${MODE}")
fpgm_export=$(func_parser_value_mode "${lines[31]}" "${MODE}")
distill_export=$(func_parser_value_mode "${lines[32]}" "${MODE}")
export_key1=$(func_parser_key "${lines[33]}")
export_value1=$(func_parser_value_mode "${lines[33]}" "${MODE}")
export_key2=$(func_parser_key "${lines[34]}")
export_value2=$(func_parser_value_mode "${lines[34]}" "${MODE}")
inference_dir=$(func_parser_value "${lines[35]}")

# whole_infer only
infer_model_dir_list=$(func_parser_value "${lines[36]}")
infer_export_list=$(func_parser_value "${lines[37]}")
infer_is_quant=$(func_parser_value "${lines[38]}")

# ------------------------------------------------------------------------------- inference params
inference_py=$(func_parser_value "${lines[39]}")
use_gpu_key=$(func_parser_key "${lines[40]}")
use_gpu_list=$(func_parser_value "${lines[40]}")
use_mkldnn_key=$(func_parser_key "${lines[41]}")
use_mkldnn_list=$(func_parser_value "${lines[41]}")
cpu_threads_key=$(func_parser_key "${lines[42]}")
cpu_threads_list=$(func_parser_value "${lines[42]}")
batch_size_key=$(func_parser_key "${lines[43]}")
batch_size_list=$(func_parser_value "${lines[43]}")
use_trt_key=$(func_parser_key "${lines[44]}")
use_trt_list=$(func_parser_value "${lines[44]}")
precision_key=$(func_parser_key "${lines[45]}")
precision_list=$(func_parser_value "${lines[45]}")
infer_model_key=$(func_parser_key "${lines[46]}")
image_dir_key=$(func_parser_key "${lines[47]}")
infer_img_dir=$(func_parser_value_mode "${lines[47]}" "${MODE}")
save_log_key=$(func_parser_key "${lines[48]}")
benchmark_key=$(func_parser_key "${lines[49]}")
benchmark_value=$(func_parser_value "${lines[49]}")
infer_key1=$(func_parser_key "${lines[50]}")
infer_value1=$(func_parser_value_mode "${lines[50]}" "${MODE}")

LOG_PATH="./test_tipc/output/${model_name}/${MODE}"
mkdir -p "${LOG_PATH}"
status_log="${LOG_PATH}/results_python.log"
rm -f "${status_log}"
touch "${status_log}"

# Built once, before the loops (upstream's GPU branch could miss it).
set_benchmark=$(func_set_params "${benchmark_key}" "${benchmark_value}")

HAS_GPU=unknown
function has_gpu() {
    if [ "${HAS_GPU}" = "unknown" ]; then
        if tipc_has_gpu "${python}"; then HAS_GPU=yes; else HAS_GPU=no; fi
    fi
    [ "${HAS_GPU}" = "yes" ]
}

function show_log() {
    # $1: status, $2: log file. Whole log on failure, its tail on success.
    if [ "$1" -ne 0 ]; then
        echo "----- ${2} (failed) -----"
        tail -n 60 "$2"
    else
        tail -n 4 "$2"
    fi
}

# Exports checkpoint $2 with export script $1 into $3 (log $4) and records the status line.
function func_export() {
    local set_weight set_save cmd status
    set_weight=$(func_set_params "${export_weight_key}" "$2")
    set_save=$(func_set_params "${save_infer_key}" "$3")
    cmd="${python} $1 ${set_weight} ${set_save} > $4 2>&1 "
    cmd=$(echo "${cmd}" | tr -s ' ')
    eval "${cmd}"
    status=$?
    show_log ${status} "$4"
    status_check ${status} "${cmd}" "${status_log}" "${model_name}" "$4"
}

function func_inference() {
    # $1 python, $2 script, $3 model dir, $4 log dir, $5 input, $6 is_quant, $7 gpu (label)
    local _python=$1 _script=$2 _model_dir=$3 _log_path=$4 _img_dir=$5 _flag_quant=$6 _gpu=${7:-}
    local IFS='|'
    local use_gpu use_mkldnn threads batch_size precision use_trt
    for use_gpu in ${use_gpu_list}; do
        if [ "${use_gpu}" = "False" ] || [ "${use_gpu}" = "cpu" ]; then
            for use_mkldnn in ${use_mkldnn_list}; do
                for threads in ${cpu_threads_list}; do
                    for batch_size in ${batch_size_list}; do
                        for precision in ${precision_list}; do
                            if [ "${use_mkldnn}" = "False" ] && [ "${precision}" = "fp16" ]; then
                                continue  # fp16 on CPU needs oneDNN (bf16)
                            fi
                            if [ "${_flag_quant}" = "True" ] && [ "${precision}" != "int8" ]; then
                                continue
                            fi
                            local _save_log_path="${_log_path}/python_infer_cpu${_gpu:+_gpus_${_gpu}}_usemkldnn_${use_mkldnn}_threads_${threads}_precision_${precision}_batchsize_${batch_size}.log"
                            local set_infer_data set_batchsize set_cpu_threads set_model_dir set_precision set_infer_params1 set_save_log set_use_gpu set_mkldnn
                            set_use_gpu=$(func_set_params "${use_gpu_key}" "${use_gpu}")
                            set_mkldnn=$(func_set_params "${use_mkldnn_key}" "${use_mkldnn}")
                            set_infer_data=$(func_set_params "${image_dir_key}" "${_img_dir}")
                            set_batchsize=$(func_set_params "${batch_size_key}" "${batch_size}")
                            set_cpu_threads=$(func_set_params "${cpu_threads_key}" "${threads}")
                            set_model_dir=$(func_set_params "${infer_model_key}" "${_model_dir}")
                            set_precision=$(func_set_params "${precision_key}" "${precision}")
                            set_save_log=$(func_set_params "${save_log_key}" "${_save_log_path}")
                            set_infer_params1=$(func_set_params "${infer_key1}" "${infer_value1}")
                            local command="${_python} ${_script} ${set_use_gpu} ${set_mkldnn} ${set_cpu_threads} ${set_model_dir} ${set_batchsize} ${set_save_log} ${set_infer_data} ${set_benchmark} ${set_precision} ${set_infer_params1} > ${_save_log_path} 2>&1 "
                            command=$(echo "${command}" | tr -s ' ')
                            eval "${command}"
                            local last_status=$?
                            show_log ${last_status} "${_save_log_path}"
                            status_check ${last_status} "${command}" "${status_log}" "${model_name}" "${_save_log_path}"
                        done
                    done
                done
            done
        elif [ "${use_gpu}" = "True" ] || [ "${use_gpu}" = "gpu" ]; then
            for use_trt in ${use_trt_list}; do
                for precision in ${precision_list}; do
                    if [ "${_flag_quant}" = "False" ] && [ "${precision}" = "int8" ]; then
                        continue
                    fi
                    if { [ "${precision}" = "fp16" ] || [ "${precision}" = "int8" ]; } && [ "${use_trt}" = "False" ]; then
                        continue
                    fi
                    if [ "${use_trt}" = "False" ] && [ "${_flag_quant}" = "True" ]; then
                        continue
                    fi
                    for batch_size in ${batch_size_list}; do
                        local _save_log_path="${_log_path}/python_infer_gpu${_gpu:+_gpus_${_gpu}}_usetrt_${use_trt}_precision_${precision}_batchsize_${batch_size}.log"
                        local set_infer_data set_batchsize set_tensorrt set_precision set_model_dir set_infer_params1 set_save_log set_use_gpu
                        set_use_gpu=$(func_set_params "${use_gpu_key}" "${use_gpu}")
                        set_infer_data=$(func_set_params "${image_dir_key}" "${_img_dir}")
                        set_batchsize=$(func_set_params "${batch_size_key}" "${batch_size}")
                        set_tensorrt=$(func_set_params "${use_trt_key}" "${use_trt}")
                        set_precision=$(func_set_params "${precision_key}" "${precision}")
                        set_model_dir=$(func_set_params "${infer_model_key}" "${_model_dir}")
                        set_save_log=$(func_set_params "${save_log_key}" "${_save_log_path}")
                        set_infer_params1=$(func_set_params "${infer_key1}" "${infer_value1}")
                        local command="${_python} ${_script} ${set_use_gpu} ${set_tensorrt} ${set_precision} ${set_model_dir} ${set_batchsize} ${set_save_log} ${set_infer_data} ${set_benchmark} ${set_infer_params1} > ${_save_log_path} 2>&1 "
                        command=$(echo "${command}" | tr -s ' ')
                        if ! has_gpu; then
                            status_skip "no GPU" "${command}" "${status_log}" "${model_name}" "${_save_log_path}"
                            continue
                        fi
                        if [ "${use_trt}" = "True" ] && ! tipc_has_tensorrt "${_python}"; then
                            status_skip "no TensorRT" "${command}" "${status_log}" "${model_name}" "${_save_log_path}"
                            continue
                        fi
                        eval "${command}"
                        local last_status=$?
                        show_log ${last_status} "${_save_log_path}"
                        status_check ${last_status} "${command}" "${status_log}" "${model_name}" "${_save_log_path}"
                    done
                done
            done
        else
            echo "Does not support hardware other than CPU and GPU currently: use_gpu=${use_gpu}"
        fi
    done
}

function func_inference_dirs() {
    # Runs func_inference for every entry of inference_dir (a '|' list; null = the export dir itself).
    # $1 python, $2 script, $3 export dir, $4 log dir, $5 input, $6 is_quant, $7 gpu label
    local _export_dir=$3
    local IFS='|'
    local entries=(${inference_dir})
    unset IFS
    local sub
    for sub in "${entries[@]}"; do
        local _model_dir=${_export_dir}
        if [ "${sub}" != "null" ] && [ -n "${sub}" ]; then
            _model_dir="${_export_dir}/${sub}"
        fi
        local _log_dir=$4
        if [ ${#entries[@]} -gt 1 ]; then
            _log_dir="$4/infer_${sub}"
            mkdir -p "${_log_dir}"
        fi
        func_inference "$1" "$2" "${_model_dir}" "${_log_dir}" "$5" "$6" "$7"
    done
}

if [ "${MODE}" = "whole_infer" ]; then
    GPUID=$3
    if [ ${#GPUID} -le 0 ]; then
        env=" "
    else
        env="export CUDA_VISIBLE_DEVICES=${GPUID}"
    fi
    eval "${env}"
    IFS='|'
    infer_models=(${infer_model_dir_list})
    infer_exports=(${infer_export_list})
    infer_quants=(${infer_is_quant})
    unset IFS
    Count=0
    for infer_model in "${infer_models[@]}"; do
        export_entry=${infer_exports[${Count}]:-null}
        is_quant=${infer_quants[${Count}]:-False}
        infer_log_path=${LOG_PATH}
        if [ ${#infer_models[@]} -gt 1 ]; then
            infer_log_path="${LOG_PATH}/infer_model_${Count}"  # keep each model's inference logs apart
            mkdir -p "${infer_log_path}"
        fi
        if [ "${export_entry}" != "null" ]; then
            save_infer_dir="${LOG_PATH}/whole_infer_export_${Count}"
            rm -rf "${save_infer_dir}"
            func_export "${export_entry}" "${infer_model}" "${save_infer_dir}" \
                "${LOG_PATH}/whole_infer_export_${Count}.log"
            func_inference_dirs "${python}" "${inference_py}" "${save_infer_dir}" "${infer_log_path}" "${infer_img_dir}" "${is_quant}" "${GPUID}"
        elif [ "${inference_dir}" != "null" ] && [ -d "${infer_model}/${inference_dir%%|*}" ]; then
            # an export dir holding the inference_dir subfolders
            func_inference_dirs "${python}" "${inference_py}" "${infer_model}" "${infer_log_path}" "${infer_img_dir}" "${is_quant}" "${GPUID}"
        else
            # already an inference model dir
            func_inference "${python}" "${inference_py}" "${infer_model}" "${infer_log_path}" "${infer_img_dir}" "${is_quant}" "${GPUID}"
        fi
        Count=$((Count + 1))
    done
else
    IFS='|'
    gpus=(${gpu_list})
    train_use_gpus=(${train_use_gpu_value})
    autocasts=(${autocast_list})
    trainers=(${trainer_list})
    unset IFS
    Count=0
    for gpu in "${gpus[@]}"; do
        train_use_gpu=${train_use_gpus[${Count}]:-${train_use_gpus[0]:-null}}
        Count=$((Count + 1))
        ips=""
        nproc=""
        if [ "${gpu}" = "-1" ]; then
            env=""
            kind=cpu
        elif [[ "${gpu}" =~ ^cpu([0-9]+)$ ]]; then
            # Project extension: data-parallel training with N CPU processes (gloo backend).
            env=""
            kind=cpu_dist
            nproc=${BASH_REMATCH[1]}
        elif [ ${#gpu} -le 1 ]; then
            env="export CUDA_VISIBLE_DEVICES=${gpu}"
            kind=gpu
        elif [ ${#gpu} -le 15 ]; then
            IFS=","
            array=(${gpu})
            unset IFS
            env="export CUDA_VISIBLE_DEVICES=${array[0]}"
            kind=gpu_dist
        else
            IFS=";"
            array=(${gpu})
            unset IFS
            ips=${array[0]}
            gpu=${array[1]}
            IFS=","
            ip_array=(${ips})
            unset IFS
            env="export CUDA_VISIBLE_DEVICES=${gpu%%,*}"
            kind=gpu_nodes
        fi
        nodes=1
        if [ -n "${ips}" ]; then
            nodes=${#ip_array[@]}
        fi

        for autocast in "${autocasts[@]}"; do
            for trainer in "${trainers[@]}"; do
                flag_quant=False
                if [ "${trainer}" = "${pact_key}" ]; then
                    run_train=${pact_trainer}; run_export=${pact_export}; flag_quant=True
                elif [ "${trainer}" = "${fpgm_key}" ]; then
                    run_train=${fpgm_trainer}; run_export=${fpgm_export}
                elif [ "${trainer}" = "${distill_key}" ]; then
                    run_train=${distill_trainer}; run_export=${distill_export}
                elif [ "${trainer}" = "${trainer_key1}" ]; then
                    run_train=${trainer_value1}; run_export=${export_value1}
                elif [ "${trainer}" = "${trainer_key2}" ]; then
                    run_train=${trainer_value2}; run_export=${export_value2}
                else
                    run_train=${norm_trainer}; run_export=${norm_export}
                fi
                if [ "${run_train}" = "null" ] || [ -z "${run_train}" ]; then
                    continue
                fi

                set_autocast=$(func_set_params "${autocast_key}" "${autocast}")
                set_epoch=$(func_set_params "${epoch_key}" "${epoch_num}")
                set_pretrain=$(func_set_params "${pretrain_model_key}" "${pretrain_model_value}")
                set_batchsize=$(func_set_params "${train_batch_key}" "${train_batch_value}")
                set_train_params1=$(func_set_params "${train_param_key1}" "${train_param_value1}")
                set_use_gpu=$(func_set_params "${train_use_gpu_key}" "${train_use_gpu}")
                run_name="${trainer}_gpus_${gpu}_autocast_${autocast}"
                if [ -n "${ips}" ]; then
                    run_name="${run_name}_nodes_${nodes}"
                fi
                save_log="${LOG_PATH}/${run_name}"
                set_save_model=$(func_set_params "${save_model_key}" "${save_log}")
                train_flags="${set_use_gpu} ${set_save_model} ${set_epoch} ${set_pretrain} ${set_autocast} ${set_batchsize} ${set_train_params1}"
                case ${kind} in
                    cpu|gpu)
                        cmd="${python} ${run_train} ${train_flags}" ;;
                    cpu_dist)
                        cmd="${python} -m paddle.distributed.launch --nproc_per_node ${nproc} --host 127.0.0.1 --log_dir=${save_log}/launch_log ${run_train} ${train_flags}" ;;
                    gpu_dist)
                        cmd="${python} -m paddle.distributed.launch --devices=${gpu} --log_dir=${save_log}/launch_log ${run_train} ${train_flags}" ;;
                    gpu_nodes)
                        cmd="${python} -m paddle.distributed.launch --ips=${ips} --devices=${gpu} --log_dir=${save_log}/launch_log ${run_train} ${train_flags}" ;;
                esac
                train_log_path="${LOG_PATH}/${run_name}_train.log"
                cmd=$(echo "${cmd} > ${train_log_path} 2>&1 " | tr -s ' ')

                if [[ "${kind}" == gpu* ]] && ! has_gpu; then
                    status_skip "no GPU" "${cmd}" "${status_log}" "${model_name}" "${train_log_path}"
                    continue
                fi

                rm -rf "${save_log}"
                unset CUDA_VISIBLE_DEVICES
                t0=$(date +%s)
                eval "${cmd}"
                train_status=$?
                echo "training took $(( $(date +%s) - t0 )) s"
                show_log ${train_status} "${train_log_path}"
                status_check ${train_status} "${cmd}" "${status_log}" "${model_name}" "${train_log_path}"

                set_eval_pretrain=$(func_set_params "${pretrain_model_key}" "${save_log}/${train_model_name}")
                # eval
                if [ "${eval_py}" != "null" ] && [ -n "${eval_py}" ]; then
                    eval "${env}"
                    set_eval_params1=$(func_set_params "${eval_key1}" "${eval_value1}")
                    eval_log_path="${LOG_PATH}/${run_name}_eval.log"
                    eval_cmd="${python} ${eval_py} ${set_eval_pretrain} ${set_eval_params1} > ${eval_log_path} 2>&1 "
                    eval_cmd=$(echo "${eval_cmd}" | tr -s ' ')
                    eval "${eval_cmd}"
                    eval_status=$?
                    show_log ${eval_status} "${eval_log_path}"
                    status_check ${eval_status} "${eval_cmd}" "${status_log}" "${model_name}" "${eval_log_path}"
                fi
                # export and inference
                if [ "${run_export}" != "null" ] && [ -n "${run_export}" ]; then
                    func_export "${run_export}" "${save_log}/${train_model_name}" "${save_log}" \
                        "${LOG_PATH}/${run_name}_nodes_${nodes}_export.log"

                    eval "${env}"
                    func_inference_dirs "${python}" "${inference_py}" "${save_log}" "${LOG_PATH}" "${train_infer_img_dir}" "${flag_quant}" "${gpu}"
                    eval "unset CUDA_VISIBLE_DEVICES"
                fi
            done
        done
    done
fi

tipc_summary "${status_log}"
exit $?
